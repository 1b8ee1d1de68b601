"""lmtool-generate on a tiny trained PTB checkpoint: streaming, the summary line, unknown words, bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmtool.config import ConfigError
from lmtool.data import Vocab
from lmtool.generate import Detokenizer, encode_prompt, generate_text, load_pretrained, run
from lmtool.train.checkpoint import CheckpointError
from lmtool.train.loop import Trainer
from tests.helpers import SMOKE, compose_config

QUICK = (*SMOKE, "trainer.final_eval=false", "trainer.max_steps=2", "trainer.eval_interval=2",
         "trainer.eval_max_segments=1")  # fmt: skip
SUMMARY = re.compile(r"^generated (\d+) tokens in [\d.]+ s \([\d.]+ tokens/s\) after a (\d+)-token prompt$")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """best.pt of a smoke-sized delta-rule model trained for two steps on PTB."""
    root = tmp_path_factory.mktemp("generate")
    Trainer(compose_config(*QUICK), root).fit()
    return root / "checkpoints" / "best.pt"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the console script as a user would, from another directory."""
    exe = Path(sys.executable).with_name("lmtool-generate")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=os.environ, timeout=300)


def test_cli_streams_a_continuation_and_reports_its_speed(checkpoint, tmp_path):
    """The continuation goes to stdout as words, then one summary line on stderr; unknown words are named."""
    proc = cli(f"checkpoint={checkpoint}", "prompt=the company xyzzy said", "max_new_tokens=15", "device=cpu",
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "lmtool-generate: not in the vocabulary, read as <unk>: xyzzy"
    match = SUMMARY.match(lines[-1])
    assert match and match.groups() == ("15", "4"), lines[-1]
    words = proc.stdout.split()
    assert 0 < len(words) <= 15 and len(words) + proc.stdout.count("\n") - 1 == 15  # <eos> prints a line break
    vocab = load_pretrained(checkpoint, "cpu").vocab
    assert all(w in vocab for w in words)
    assert list(tmp_path.iterdir()) == []  # nothing left in the working directory


def test_cli_greedy_cached_and_uncached_print_the_same(checkpoint, tmp_path):
    """temperature=0 prints the same text with and without the cache (a window of 8 that slides)."""
    common = (f"checkpoint={checkpoint}", "prompt=the market", "max_new_tokens=20", "temperature=0", "max_context=8")
    cached, reference = cli(*common, cwd=tmp_path), cli(*common, "cache=false", cwd=tmp_path)
    assert cached.returncode == 0 and reference.returncode == 0, cached.stderr + reference.stderr
    assert cached.stdout == reference.stdout and cached.stdout.strip()


@pytest.mark.parametrize(
    "args,message",
    [
        (("checkpoint=/nonexistent/best.pt", "prompt=the"), "does not exist"),
        (("prompt=the", "top_p=1.5"), "top_p must be in (0, 1]"),
    ],
    ids=["missing-checkpoint", "top_p"],
)
def test_cli_bad_input_is_one_line(checkpoint, tmp_path, args, message):
    """Bad input exits non-zero with one line and no traceback."""
    args = args if args[0].startswith("checkpoint=") else (f"checkpoint={checkpoint}", *args)
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (("prompt=''",), ConfigError, "prompt is empty"),
        (("prompt=the", "max_new_tokens=0"), ConfigError, "max_new_tokens"),
        (("prompt=the", "top_p=0"), ConfigError, "top_p"),
        (("prompt=the", "temperature=-1"), ConfigError, "temperature"),
        (("prompt=the", "num_samples=0"), ConfigError, "num_samples"),
        ((), ConfigError, "exactly one of prompt"),
        (("prompt_file=/nonexistent.txt",), ConfigError, "does not exist"),
        (("prompt=the", "max_context=-2"), ConfigError, "max_context"),
    ],
    ids=["empty-prompt", "max-new-tokens", "top_p-zero", "temperature", "num-samples", "no-prompt", "prompt-file",
         "max-context"],  # fmt: skip
)
def test_bad_options_fail_before_generating(checkpoint, overrides, error, message, capsys):
    """Each bad option raises the error the CLI turns into one line, before any token is printed."""
    cfg = compose_config(f"checkpoint={checkpoint}", *overrides, config_name="generate")
    with pytest.raises(error, match=re.escape(message)) as err:
        run(cfg)
    assert "\n" not in str(err.value) and capsys.readouterr().out == ""


def test_corrupt_checkpoint_is_refused(tmp_path):
    """A truncated checkpoint file is refused with a CheckpointError naming it."""
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = compose_config(f"checkpoint={bad}", "prompt=the", config_name="generate")
    with pytest.raises(CheckpointError, match="corrupt"):
        run(cfg)


def test_prompt_file_and_num_samples(checkpoint, tmp_path, capsys):
    """A long prompt comes from a file; num_samples prints that many headed samples, seeds seed, seed + 1, ..."""
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the company said it expects\nthe market to rise\n")
    cfg = compose_config(f"checkpoint={checkpoint}", f"prompt_file={prompt}", "num_samples=2", "max_new_tokens=6",
                         "device=cpu", config_name="generate")  # fmt: skip
    run(cfg)
    out, err = capsys.readouterr()
    assert out.count("=== sample") == 2
    assert SUMMARY.match(err.strip().splitlines()[-1]).groups() == ("12", "10")  # 9 words and one <eos>


def test_python_api_is_seeded(checkpoint):
    """load_pretrained + generate_text: the same seed gives the same text, another seed other text."""
    pretrained = load_pretrained(checkpoint, "cpu")
    first = generate_text(pretrained, "the company", max_new_tokens=30, seed=5)
    assert first == generate_text(pretrained, "the company", max_new_tokens=30, seed=5)
    assert first != generate_text(pretrained, "the company", max_new_tokens=30, seed=6)


def test_character_prompts_and_output():
    """Character level: one token per character, spaces as PTB-char's `_`, end of line as a line break."""
    vocab = Vocab(["<eos>", "_", "a", "b"], unk=None)
    ids, missing = encode_prompt("ab a\nb", vocab, "char")
    assert vocab.decode(ids) == ["a", "b", "_", "a", "<eos>", "b"] and missing == []
    detok = Detokenizer(vocab, "char")
    assert "".join(detok.piece(i) for i in ids) == "ab a\nb"
    with pytest.raises(ConfigError, match="'c'"):
        encode_prompt("abc", vocab, "char")


def test_word_output_joins_words_and_breaks_lines():
    """Word level: words joined by single spaces, <eos> as a line break with no trailing space."""
    vocab = Vocab(["<eos>", "<unk>", "the", "market"])
    detok = Detokenizer(vocab, "word")
    ids = vocab.encode(["the", "market", "<eos>", "the"])
    assert "".join(detok.piece(i) for i in ids) == "the market\nthe"

from lmtool.train import main

main()

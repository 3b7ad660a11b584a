from bft.cli import main

main()

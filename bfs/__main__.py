from bfs.cli import main

main()

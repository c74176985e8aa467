from metalearn.cli import main

main()

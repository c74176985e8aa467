from metalearn.cli import main

main(whole_process=True)

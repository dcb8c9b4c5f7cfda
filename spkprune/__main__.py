from spkprune.cli import main

main()

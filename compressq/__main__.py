from compressq.cli.app import main

main()

from compressq.cli import main

main()

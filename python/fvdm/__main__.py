from fvdm.cli import main

main()

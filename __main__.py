from kascade.cli import main

main()

from lungsql.cli import main

main()

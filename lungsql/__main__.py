from lungsql.client.cli import main

main()

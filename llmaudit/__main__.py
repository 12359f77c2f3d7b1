from llmaudit.cli import main

main()

from llmaudit.cli import main

if __name__ == "__main__":  # not in a multiprocessing child that re-imports the parent's main module
    main()

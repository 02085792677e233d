if __name__ == "__main__":  # `python -m llmux.worker`; see llmux/workers/main.py
    from llmux.workers.main import main
    main()

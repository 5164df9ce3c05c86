"""``python -m dist_finetune`` and ``accelerate launch -m dist_finetune`` run the CLI."""

from .cli import main

if __name__ == "__main__":
    main()

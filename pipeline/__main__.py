"""Entry point for `python -m pipeline`.

The main guard matters: img2dataset's helpers use the spawn start method, which re-imports the
main module in every child process.
"""

from pipeline.cli import main

if __name__ == "__main__":
    main()

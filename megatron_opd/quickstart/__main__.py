import sys

from megatron_opd.quickstart.run import main

if __name__ == "__main__":
    sys.exit(main())

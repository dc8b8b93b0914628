import sys

from routenlp.cli.main import main

sys.exit(main())

import sys

from qlora_pipeline.cli import main

sys.exit(main())

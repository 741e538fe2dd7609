import sys

from pipeline.finetune import main

sys.exit(main())

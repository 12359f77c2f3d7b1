import sys

from modules.agent.endpoint import main

sys.exit(main())

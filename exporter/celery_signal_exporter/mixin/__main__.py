import sys

from celery_signal_exporter.mixin.generate import main

sys.exit(main())

"""``python -m export --run runs/<name>``: re-export and verify a run's ONNX bundle.

A thin script, not an installed module: it runs when ``src/`` is on the path (an editable
install puts it there, as does ``cd src``). The command itself lives in
:mod:`classifier_training.deploy.export_cli`, also installed as the ``classifier-export`` console
script for installs that are not editable (the Docker image).
"""

import sys

from classifier_training.deploy.export_cli import main

if __name__ == "__main__":
    sys.exit(main())

"""Hydra takes launchers only from the `hydra_plugins` namespace: qa-lab's SLURM launcher.

The code is `qa_lab.hydra_launcher`. pyproject.toml installs this folder with qa_lab (importable
from any folder); a script run from the checkout finds it too, and the launcher puts the root on
its jobs' PYTHONPATH for clusters whose nodes lack the install.
"""

from qa_lab.hydra_launcher import ResumableSlurmLauncher as _Launcher


class ResumableSlurmLauncher(_Launcher):
    """`qa_lab.hydra_launcher.ResumableSlurmLauncher` under the name Hydra accepts."""

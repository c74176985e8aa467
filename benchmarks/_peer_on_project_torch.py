"""Run a peer script (``_l2l_step.py``) with this interpreter's torch and the peer venv's
learn2learn: ``python _peer_on_project_torch.py PEER_SITE_PACKAGES SCRIPT [ARGS...]``.

``maml_step.py --peer-on-project-torch PEER_SITE_PACKAGES`` uses it so that learn2learn and
metalearn are timed on the same torch build (the peer venv has its own, newer torch). The peer's
site-packages go at the end of ``sys.path``, so this interpreter's torch wins; its torchvision,
built for the other torch, cannot load here, and learn2learn imports it (and gym) only for its
datasets and environments, so those packages are replaced by empty stand-ins: the MAML wrapper
needs torch alone.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
from unittest import mock

STUBBED = ("torchvision", "torchaudio", "torchtext", "gym")


class StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of the STUBBED packages (and their submodules) give empty mock modules."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = mock.MagicMock(name=spec.name)
        module.__path__, module.__spec__ = [], spec
        return module

    def exec_module(self, module):
        pass


if __name__ == "__main__":
    site_packages, script = sys.argv[1], sys.argv[2]
    sys.meta_path.insert(0, StandIns())
    sys.path.append(site_packages)
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")

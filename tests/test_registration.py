"""Registration round trip, each step in a subprocess with the environment of a fresh shell."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from nnunetv2_gtv import registration

from conftest import clean_env, run_cli


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture
def registered_afterwards():
    """Whatever a test does, leave the plugin registered for the other tests."""
    yield
    registration.register()


def _stock_train_finds(trainer: str, env: dict) -> bool:
    # the stock command looks the trainer up before it looks for the dataset: a missing dataset is reported
    # only once the trainer was found
    result = run_cli(["nnUNetv2_train", "999", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"], env, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    if "Could not find requested nnunet trainer" in output:
        return False
    assert "999" in output, output[-2000:]  # failed on the missing dataset instead
    return True


def test_register_check_remove_round_trip(registered_afterwards):
    env = clean_env()
    nnunet_root, _ = registration.find_nnunet()
    run_cli(["nnunetv2-gtv", "remove"], env)
    pristine = _tree_digest(nnunet_root)

    first = run_cli(["nnunetv2-gtv", "register"], env)
    assert "registered: wrote" in first.stdout
    after_first = _tree_digest(nnunet_root)
    second = run_cli(["nnunetv2-gtv", "register"], env)
    assert "already registered" in second.stdout
    assert _tree_digest(nnunet_root) == after_first  # idempotent

    check = run_cli(["nnunetv2-gtv", "check"], env)
    assert "MISSING" not in check.stdout and f"nnunetv2 {registration.version('nnunetv2')}" in check.stdout
    for name in registration.ALL_TRAINER_NAMES + registration.PLANNER_NAMES:
        assert any("[ok]" in line and name in line for line in check.stdout.splitlines()), name
    assert _stock_train_finds("nnUNetTrainerGTV25DLocal", env)

    removed = run_cli(["nnunetv2-gtv", "remove"], env)
    assert removed.stdout.count("removed") == 2
    assert _tree_digest(nnunet_root) == pristine  # nnunetv2 exactly as before
    missing = run_cli(["nnunetv2-gtv", "check"], env, check=False)
    assert missing.returncode == 1 and "MISSING" in missing.stdout and "nnunetv2-gtv register" in missing.stdout
    assert not _stock_train_finds("nnUNetTrainerGTV25DLocal", env)


def test_unsupported_or_missing_nnunet_is_refused_without_writing(monkeypatch, tmp_path):
    monkeypatch.setattr(registration, "version", lambda name: "2.9.3")
    with pytest.raises(registration.RegistrationError, match=r"2\.9\.3 is not supported.*nothing was written"):
        registration.register()

    def not_installed(name):
        raise registration.PackageNotFoundError(name)

    monkeypatch.setattr(registration, "version", not_installed)
    with pytest.raises(registration.RegistrationError, match="nnunetv2 is not installed"):
        registration.register()


def test_cli_reports_unsupported_version_with_exit_code(monkeypatch, capsys):
    from nnunetv2_gtv.cli import registration as cli

    monkeypatch.setattr(registration, "version", lambda name: "2.7.0")
    assert cli.main(["register"]) == 2
    assert "2.7.0 is not supported" in capsys.readouterr().err


def test_leftover_shims_never_break_nnunet_when_the_plugin_is_uninstalled():
    """Simulate `pip uninstall nnunetv2-gtv` with the shims still in place: nnU-Net must still find its own
    trainers, and ours are simply not found."""
    import subprocess
    import sys

    registration.register()
    code = (
        "import sys\n"
        "class Uninstalled:\n"  # an import finder that makes nnunetv2_gtv unimportable, as after pip uninstall
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'nnunetv2_gtv':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Uninstalled())\n"
        "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
        "print(find('nnUNetTrainer_5epochs').__name__)\n"
        "try:\n    find('nnUNetTrainerGTV25DLocal')\nexcept RuntimeError:\n    print('ours not found')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["nnUNetTrainer_5epochs", "ours", "not", "found"]


def test_shim_folders_are_readable_by_other_users(registered_afterwards):
    """mkdtemp makes private folders; the renamed shim folder must get the umask's ordinary permissions."""
    registration.remove()
    registration.register()
    nnunet_root, _ = registration.find_nnunet()
    umask = os.umask(0)
    os.umask(umask)
    for folder in registration.plugin_folders(nnunet_root):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, oct(folder.stat().st_mode)

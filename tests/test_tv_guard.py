"""The torchvision guard makes timm importable and stays out of the way otherwise."""
import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_timm_imports_after_guard():
    proc = _run("import core.tv_guard, timm, torchvision; "
                "m = timm.create_model('vit_small_patch14_dinov2', pretrained=False, img_size=56); print('ok')")
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_guard_only_patches_when_plain_import_fails():
    # Does torchvision import on its own here? The guard must patch exactly when it does not.
    plain = _run("import torchvision")
    proc = _run("import core.tv_guard as g; print(g.patched)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(plain.returncode != 0)


def test_guard_is_idempotent():
    proc = _run("import core.tv_guard as g; a = g.ensure_torchvision(); b = g.ensure_torchvision(); "
                "import torchvision; print(a == b)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"

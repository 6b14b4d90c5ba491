"""The demo project: scikit-image's bundled photographs, created once, offline."""
from __future__ import annotations

from stego_app import demo, ingest, projects


def test_demo_files_are_bundled_photographs():
    files = demo.demo_image_files()
    assert len(files) == len(demo.DEMO_FILES)          # all present in the installed wheel, no download
    assert all(path.is_file() and "skimage" in str(path) for _, path in files)
    assert not any("camvid" in str(path).lower() for _, path in files)


def test_demo_project_is_created_once(app_ctx):
    p = projects.ensure_demo_project(app_ctx)
    assert p is not None and p.is_demo and p.name == "Demo"
    images = ingest.list_images(app_ctx, p.id)
    assert len(images) == len(demo.DEMO_FILES) == p.n_images
    assert {i.name for i in images} == {name for name, _ in demo.DEMO_FILES}
    gray = next(i for i in images if i.name == "camera_man.png")
    assert gray.mode == "L" and ingest.load_rgb(app_ctx, gray.id).shape == (gray.height, gray.width, 3)
    assert projects.ensure_demo_project(app_ctx) is None          # second start: nothing new
    assert len(projects.list_projects(app_ctx)) == 1


def test_demo_name_does_not_clash_with_a_user_project(app_ctx):
    projects.create_project(app_ctx, "demo")
    p = projects.ensure_demo_project(app_ctx)
    assert p is not None and p.name == "Demo 2"

"""Spec parsing: every mistake gives one message naming file, key (line) and problem.
Pure logic: these tests read TOML only, never apt or the cache."""

from pathlib import Path

import pytest

from megafleet.imagegen.spec import SpecError, load

KERNEL = '[kernel]\npackage = "linux-image-cloud-amd64"\nmodules = ["virtio_net"]\n'


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load(path)
    return str(info.value)


def test_minimal_spec_loads(tmp_path):
    spec = load(write(tmp_path, "a.toml", 'name = "mfi-a"\n' + KERNEL))
    assert spec.name == "mfi-a"
    assert spec.kernel_package == "linux-image-cloud-amd64"
    assert spec.modules == ["virtio_net"]
    assert spec.compress_level == 19


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\npackagez = ["frr"]\n' + KERNEL)
    assert error_of(p) == (f"{p}:2: key 'packagez': unknown key (allowed: compress_level, "
                           "description, exclude, exclude_packages, files, kernel, name, "
                           "overlays, packages, parents, services)")


def test_unknown_kernel_key_names_the_dotted_key(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\n[kernel]\npackage = "linux-image-cloud-amd64"\nmodulez = []\n')
    assert error_of(p) == (f"{p}:4: key 'kernel.modulez': unknown key "
                           "(allowed: build, modules, modules_dir, package, source, vmlinuz)")


def test_toml_syntax_error_names_the_line(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\npackages = ["frr"\n')
    msg = error_of(p)
    assert msg.startswith(f"{p}:")
    assert "TOML syntax error" in msg


def test_wrong_type(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\npackages = "frr"\n' + KERNEL)
    assert error_of(p) == f"{p}:2: key 'packages': must be a list of strings"


def test_invalid_package_name(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\npackages = ["Frr Routing"]\n' + KERNEL)
    assert error_of(p) == f"{p}:2: key 'packages': 'Frr Routing' is not a valid Debian package name"


def test_missing_name(tmp_path):
    p = write(tmp_path, "a.toml", KERNEL)
    assert error_of(p) == f"{p}: missing key 'name' (every spec names its image)"


def test_bad_image_name(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "../etc"\n' + KERNEL)
    assert "key 'name': invalid image name '../etc'" in error_of(p)


def test_no_kernel(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\n')
    assert "key 'kernel': no kernel" in error_of(p)


def test_missing_parent(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\nparents = ["nope.toml"]\n')
    assert error_of(p) == f"{p}:2: key 'parents': parent spec 'nope.toml' not found ({tmp_path / 'nope.toml'})"


def test_circular_parents(tmp_path):
    write(tmp_path, "a.toml", 'name = "mfi-a"\nparents = ["b.toml"]\n' + KERNEL)
    p = write(tmp_path, "b.toml", 'name = "mfi-b"\nparents = ["a.toml"]\n' + KERNEL)
    assert "circular inheritance" in error_of(p)


def test_file_needs_text_or_source(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\n' + KERNEL + '[files."/etc/x"]\nmode = "0644"\n')
    assert error_of(p) == f"{p}:5: key 'files.\"/etc/x\"': give exactly one of text or source"


def test_file_source_must_exist(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\n' + KERNEL + '[files."/etc/x"]\nsource = "missing.txt"\n')
    assert "key 'files.\"/etc/x\".source': 'missing.txt' does not exist" in error_of(p)


def test_bad_mode(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\n' + KERNEL + '[files."/etc/x"]\ntext = "x"\nmode = "rwx"\n')
    assert "key 'files.\"/etc/x\".mode': 'rwx' is not an octal mode" in error_of(p)


def test_service_needs_command(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\n' + KERNEL + '[services.web]\nstart = true\n')
    assert error_of(p).endswith("key 'services.web.command': missing: the command that starts the service")


def test_local_kernel_needs_both_parts(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"x")
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\n[kernel]\nvmlinuz = "vmlinuz"\n')
    assert "key 'kernel.modules_dir': a local kernel needs both vmlinuz and modules_dir" in error_of(p)


def test_parents_merge_lists_tables_and_scalars(tmp_path):
    (tmp_path / "ov").mkdir()
    write(tmp_path, "base.toml", 'name = "mfi-base"\nexclude = ["usr/share/doc"]\n'
          'packages = ["a1"]\n' + KERNEL + '[services.one]\ncommand = "true"\n')
    p = write(tmp_path, "child.toml", 'name = "mfi-child"\nparents = ["base.toml"]\n'
              'packages = ["b2", "a1"]\noverlays = ["ov"]\ncompress_level = 3\n'
              '[kernel]\nmodules = ["virtio_console"]\n[services.two]\ncommand = "true"\nstart = false\n')
    spec = load(p)
    assert spec.name == "mfi-child"
    assert spec.packages == ["a1", "b2"]
    assert spec.modules == ["virtio_net", "virtio_console"]
    assert spec.exclude == ["usr/share/doc"]
    assert sorted(spec.services) == ["one", "two"] and spec.services["two"].start is False
    assert spec.overlays == [tmp_path / "ov"]
    assert spec.compress_level == 3
    assert spec.chain == [tmp_path / "base.toml", p]


def test_example_specs_load():
    examples = Path(__file__).resolve().parents[2] / "examples" / "images"
    tiny = load(examples / "tiny.toml")
    router = load(examples / "router.toml")
    assert tiny.name == "tiny" and router.name == "router"
    assert "frr" in router.packages and router.modules == tiny.modules
    assert "zebra" in router.services


def test_built_kernel_replaces_the_parents_package(tmp_path):
    write(tmp_path, "base.toml", 'name = "mfi-base"\n' + KERNEL)
    spec = load(write(tmp_path, "a.toml", 'name = "mfi-a"\nparents = ["base.toml"]\n'
                                          '[kernel]\nbuild = "minimal"\n'))
    assert (spec.kernel_build, spec.kernel_source, spec.kernel_package) == ("minimal", None, None)
    assert spec.to_json()["kernel"]["build"] == "minimal"
    frag = write(tmp_path, "mine.config", "CONFIG_NET=y\n")
    spec = load(write(tmp_path, "b.toml", 'name = "mfi-b"\n[kernel]\nbuild = "mine.config"\n'
                                          'source = "linux-source-6.1"\n'))
    assert (spec.kernel_build, spec.kernel_source) == (frag, "linux-source-6.1")


def test_built_kernel_mistakes_name_the_line(tmp_path):
    p = write(tmp_path, "a.toml", 'name = "mfi-a"\n[kernel]\npackage = "linux-image-cloud-amd64"\n'
                                  'build = "minimal"\n')
    assert error_of(p) == f"{p}:4: key 'kernel.build': give one kernel: a package, vmlinuz + modules_dir, or build"
    p = write(tmp_path, "b.toml", 'name = "mfi-b"\n[kernel]\nbuild = "huge"\n')
    assert error_of(p) == (f"{p}:3: key 'kernel.build': 'huge' is neither a fragment megafleet ships "
                           "(minimal) nor a path to a config fragment")
    p = write(tmp_path, "c.toml", 'name = "mfi-c"\n[kernel]\nbuild = "none.config"\n')
    assert f"{p}:3: key 'kernel.build': 'none.config' does not exist" in error_of(p)
    p = write(tmp_path, "d.toml", 'name = "mfi-d"\n' + KERNEL + 'source = "linux-source-6.1"\n')
    assert error_of(p) == f"{p}:5: key 'kernel.source': the source package is for a built kernel: set kernel.build too"

"""The tools' shared behaviour: console scripts, --help, --print_config, the generated config reference, and
how predict reads images of every common mode."""
import configparser
import importlib
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from jaxseg.cli import config_reference, predict, train

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "eomt" / "scenes.py") + ":runlocal"


def test_every_console_script_is_a_main_of_jaxseg_cli_and_of_a_tools_wrapper():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    scripts = [line.split("=") for line in setup["options.entry_points"]["console_scripts"].split("\n") if line]
    assert len(scripts) == 8
    for name, target in scripts:
        module, function = target.strip().split(":")
        main = getattr(importlib.import_module(module), function)
        assert main(["--help"]) == 0, name
    wrapped = {line.split()[1] for path in (ROOT / "tools").glob("*.py")
               for line in path.read_text().splitlines() if line.startswith("from jaxseg.cli.")}
    assert wrapped == {target.split(":")[0].strip() for _, target in scripts}


def test_print_config_prints_the_resolved_config_and_touches_nothing(tmp_path, capsys):
    assert train.main(["--config", CONFIG, "--set", "train.total_steps=7", "--print_config",
                       "--workdir", str(tmp_path / "run")]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["train"]["total_steps"] == 7 and config["method"]["name"] == "eomt"
    assert not (tmp_path / "run").exists()


def test_docs_config_md_is_the_generated_reference():
    """Regenerate with `python -m jaxseg.cli.config_reference > docs/config.md`."""
    reference = config_reference.reference()
    assert (ROOT / "docs" / "config.md").read_text() == reference
    for key in ("`train.total_steps`", "`optimizer.lr`", "`method.set_loss.importance_sample_ratio`",
                "`model.encoder.drop_path_rate`", "`evals.<name>.predictor.score_threshold`", "`data.name`"):
        assert key in reference, key


@pytest.mark.parametrize("mode", ["I;16", "P", "L", "LA", "RGBA", "RGB"])
def test_predict_reads_every_common_image_mode_as_rgb(tmp_path, mode):
    ramp = np.linspace(0, 1, 24 * 16).reshape(16, 24)
    if mode == "I;16":  # a 16-bit PNG: scaled to 8 bits, not clipped at 255
        Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "image.png")
        expected = np.repeat(np.round(ramp * 255).astype(np.uint8)[..., None], 3, -1)
    else:
        rgb = (np.stack([ramp, 1 - ramp, ramp * 0.5], -1) * 255).astype(np.uint8)
        image = Image.fromarray(rgb).convert(mode)
        image.save(tmp_path / "image.png")
        expected = np.asarray(image.convert("RGBA" if mode == "P" else mode).convert("RGB"))
    read = predict.read_image(tmp_path / "image.png")
    assert read.dtype == np.uint8 and read.shape == (16, 24, 3)
    np.testing.assert_allclose(read.astype(int), expected.astype(int), atol=1)

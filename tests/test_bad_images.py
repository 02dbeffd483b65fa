"""An image folder with an unreadable file: main.py stops with one line naming it and leaves no output behind."""
import numpy as np
from PIL import Image

from helpers import TINY_STAGE1, run_script


def test_an_unreadable_image_stops_main_with_one_line_and_no_output(tmp_path):
    rng = np.random.default_rng(0)
    for label in ('a', 'b'):
        (tmp_path / 'images' / label).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / 'images' / label / f'{i:02d}.png')
    broken = tmp_path / 'images' / 'b' / '05.png'
    broken.write_bytes(b'not a png at all')
    out_dir = tmp_path / 'out'
    flags = [f for f in TINY_STAGE1 if f not in ('--num_train', '480', '--num_val', '128')]
    result = run_script(['main.py', '--arch', 'vq_vae', *flags, '--batch_size', '4', '--dataset', 'imagefolder',
                         '--data_dir', tmp_path / 'images', '--image_size', '32', '--out_dir', out_dir])
    # The progress bar of the epoch that met the file comes first on stderr; the error is the one line after it.
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])
    assert 'cannot read image' in errors[0] and '05.png' in errors[0]
    assert not out_dir.exists()

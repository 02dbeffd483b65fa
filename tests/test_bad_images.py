"""An image folder with an unreadable file: main.py, as a real process, stops with one line naming it and leaves no
output behind. The run starts in the background with the session (see tests/background.py)."""


def test_an_unreadable_image_stops_main_with_one_line_and_no_output(process_checks):
    job, out_dir, fragment = process_checks['stage1_unreadable_image']
    result = job.result()
    # The progress bar of the epoch that met the file comes first on stderr; the error is the one line after it.
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr[-3000:]
    assert 'Warning' not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0])
    assert fragment in errors[0] and '05.png' in errors[0]
    assert not out_dir.exists()

"""evaluate.py on samples through the real script (real shapes test images score near the train-vs-test floor, noise
far worse, the classifier is trained once and then re-used, bad input ends in one line and writes nothing), and its
pieces in process: reading sample folders, decoding codes.pt, the classifier cache, the FID Inception network's
loading. Models (--vq_checkpoint with --prior_checkpoint) are in test_evaluate_models.py."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common.features as features
import evaluate
from common.data import build_dataset, to_uint8
from common.errors import UserError
from common.features import (FID_WEIGHTS_URL, ClassifierSettings, build_fid_inception, dataset_classifier,
                             load_fid_inception, load_images, outlier_images, to_float, train_classifier)
from evaluate import check_samples, decode_codes_file, load_vq_for_codes, read_codes_file, read_sample_folder
from helpers import assert_one_line_error, assert_succeeded, finish, run_in_process, script_env, start_script
from models import VQVAE, VQVAE2, save_checkpoint

pytestmark = pytest.mark.usefixtures('single_thread')

NUM_SAMPLES = 300
# A classifier that trains in a few seconds: 100 steps on 1500 shapes; the same settings for CAS and its baseline.
TINY_CLASSIFIER = ['--classifier_num_train', '1500', '--classifier_epochs', '1', '--classifier_min_steps', '100']
TINY_VQ = dict(image_size=16, hidden_channels=16, res_channels=8, num_res_blocks=1, num_embeddings=16, embedding_dim=8)
SHAPES_INFO = build_dataset('shapes', 'test', 32, num_samples=1)[1]


def save_png(array, path):
    """Write a uint8 array [C, H, W] (C = 1 or 3) as a PNG file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)).save(path)


def write_pngs(folder, count, size=32, channels=3, seed=0):
    """`count` uniform-noise PNGs directly in folder."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        save_png(rng.integers(0, 256, (channels, size, size), dtype=np.uint8), os.path.join(folder, f'{index}.png'))


def save_vq(path, cls, image_size=16):
    """An untrained tiny VQ model checkpoint with the 'data' entry stage 1 writes."""
    torch.manual_seed(0)
    model = cls(**{**TINY_VQ, 'image_size': image_size})
    save_checkpoint({'kind': model.kind, 'config': model.config, 'model': model.state_dict(),
                     'data': {'name': 'shapes', 'image_size': image_size, 'data_dir': 'data', 'seed': 0}}, path)
    return model


@pytest.fixture(scope='module')
def paths(tmp_path_factory, classifier_dir):
    """Sample folders, codes files and checkpoints for the script runs."""
    root = tmp_path_factory.mktemp('evaluate')
    test_set, info = build_dataset('shapes', 'test', 32)
    for index in range(NUM_SAMPLES):  # real test images, one subfolder per class name: class-conditional samples
        image, label = test_set[index]
        save_png(to_uint8(image).numpy(), str(root / 'real' / info['class_names'][label] / f'{index}.png'))
    write_pngs(str(root / 'noise'), NUM_SAMPLES)
    write_pngs(str(root / 'small'), 5, size=16)
    write_pngs(str(root / 'few'), 3)
    os.makedirs(root / 'empty')
    save_vq(str(root / 'vq.pth'), VQVAE)
    torch.save({'codes': torch.randint(0, 16, (8, 4, 4)), 'class_labels': torch.arange(8) % 6}, root / 'codes.pt')
    torch.save({'codes': torch.randint(0, 16, (8, 3, 3))}, root / 'codes_3x3.pt')
    return {name: str(root / name) for name in ('real', 'noise', 'small', 'few', 'empty', 'vq.pth', 'codes.pt',
                                                'codes_3x3.pt', 'torch_home')} | \
        {'root': str(root), 'classifiers': str(classifier_dir)}


def evaluate_args(paths, samples, name, *extra):
    """An evaluate.py command line writing into <root>/out_<name>, with the tiny classifier cached in the session's
    one place (the same settings in test_evaluate_models.py, so each image size's classifier trains once)."""
    return ['--samples', samples, '--out_dir', os.path.join(paths['root'], f'out_{name}'),
            '--classifier_dir', paths['classifiers'], '--num_real', '500', '--device', 'cpu', *TINY_CLASSIFIER,
            *extra]


# name -> (samples, extra flags, a fragment the one-line error must contain); the script runs of bad input
SCRIPT_ERRORS = {
    'empty': ('empty', [], 'no PNG/JPG/JPEG images'),
    'no_inception_weights': ('real', ['--features', 'inception'], 'FID Inception weights not found'),
    'codes_without_vq': ('codes.pt', [], 'pass --vq_checkpoint'),
}
REAL_PROCESS = 'empty'  # the one bad input run as a real process: exit status 2 and one line, imports and all
# The same, checked in process: main() must raise before it writes anything.
MAIN_ERRORS = {
    'wrong_size': ('small', [], 'is 16x16 but shapes images are 32x32'),
    'too_few': ('few', [], 'holds 3 samples; at least 4 are needed'),
    'missing': ('nowhere', [], 'not found'),
    'codes_wrong_grid': ('codes_3x3.pt', ['--vq_checkpoint', '{vq.pth}'], 'has shape [8, 3, 3]'),
    'num_real_too_small': ('noise', ['--num_real', '2'], '--num_real must be at least 4'),
}


def cached_classifiers(paths, image_size):
    """{num_train: file} of the classifiers cached for shapes at image_size (None: the whole training split)."""
    folder = paths['classifiers']
    files = [name for name in os.listdir(folder) if name.startswith(f'classifier_shapes_{image_size}px_')] \
        if os.path.isdir(folder) else []
    return {torch.load(os.path.join(folder, name), weights_only=True)['key']['num_train']: name for name in files}


@pytest.fixture(scope='module')
def runs(paths):
    """Script runs: the real-image one (which trains and caches the classifier, unless this session did already) and
    the bad inputs. One bad input runs as a real process, started first so that it imports torch meanwhile; the others
    run the script in this process (helpers.run_in_process: the same parser, main and one-line errors)."""
    commands = {'real': evaluate_args(paths, paths['real'], 'real')}
    for name, (samples, extra, _) in SCRIPT_ERRORS.items():
        commands[name] = evaluate_args(paths, paths[samples], name, *extra)
    env = {'TORCH_HOME': paths['torch_home']}  # an empty hub cache: no Inception weights
    process = start_script(['evaluate.py', *commands.pop(REAL_PROCESS)], env=script_env(**env))
    trained_before = cached_classifiers(paths, 32)
    results = {name: run_in_process(['evaluate.py', *args], env=env) for name, args in commands.items()}
    results[REAL_PROCESS] = finish(process)
    results['classifier_was_cached'] = bool(trained_before)
    return results


def run_main_in_process(paths, samples, name, *extra):
    """evaluate.main on a command line, in this process (no seconds spent importing torch again)."""
    evaluate.main(evaluate.build_parser().parse_args(evaluate_args(paths, samples, name, *extra)))


def scores_of(paths, name):
    """The result of run `name` from its eval.json."""
    with open(os.path.join(paths['root'], f'out_{name}', 'eval.json')) as f:
        return json.load(f)


def test_real_images_score_near_the_floor_and_noise_far_worse(paths, runs, monkeypatch):
    assert_succeeded(runs['real'])
    assert 'fid' in runs['real'].stdout and 'eval.json' in runs['real'].stdout
    # Trained by this run, unless an earlier test of the session cached it with the same settings.
    assert ('training the shapes classifier' in runs['real'].stderr) != runs['classifier_was_cached']

    def no_training(*args, **kwargs):
        raise AssertionError('the cached classifier was not re-used')
    monkeypatch.setattr(features, 'train_classifier', no_training)
    monkeypatch.setattr(evaluate, 'train_classifier', no_training)  # unconditional samples: no CAS either
    run_main_in_process(paths, paths['noise'], 'noise')

    real, noise = scores_of(paths, 'real'), scores_of(paths, 'noise')
    assert real['num_samples'] == noise['num_samples'] == NUM_SAMPLES and real['num_real'] == 500
    assert real['class_conditional'] and not noise['class_conditional']
    r, n = real['scores'], noise['scores']
    assert r['fid'] < 2 * r['fid_train_vs_test']
    assert n['fid'] > 50 * r['fid_train_vs_test'] and n['kid_mean'] > 100 * abs(r['kid_mean'])
    assert r['precision'] > 0.8 and r['recall'] > 0.8 and n['precision'] < 0.2 and n['recall'] < 0.2
    assert r['classifier_test_accuracy'] > 0.3 and r['classifier_test_accuracy'] == n['classifier_test_accuracy']
    assert r['confident_fraction'] > 0.2 and n['confident_fraction'] < 0.05  # noise is no shape (outlier exposure)
    assert {'cas', 'cas_real_baseline'} <= set(r) and not {'cas', 'cas_real_baseline'} & set(n)
    assert 0 <= r['cas'] <= 1 and 0 <= r['cas_real_baseline'] <= 1


def test_codes_file_is_decoded_with_the_vq_checkpoints_data_settings(paths, runs):
    json_path = os.path.join(paths['root'], 'elsewhere', 'scores.json')
    # Dataset settings come from the VQ checkpoint (shapes at 16x16); its classifier (the tiny one, shared with
    # test_evaluate_models.py through the session's classifier folder) trains in a few seconds or is read back.
    run_main_in_process(paths, paths['codes.pt'], 'codes', '--vq_checkpoint', paths['vq.pth'], '--num_fit', '100',
                        '--json', json_path)
    with open(json_path) as f:
        result = json.load(f)
    assert result['image_size'] == 16 and result['num_samples'] == 8 and result['class_conditional']
    assert 'cas' in result['scores']
    # --vq_checkpoint is evaluated as a model too: without a prior, reconstruction and the decoder's bits only.
    assert set(result['reconstruction']) == {'mse', 'psnr', 'perplexity/flat', 'code_usage/flat',
                                             'confident_fraction', 'classifier_accuracy'}
    assert result['decoder_bits_per_dim'] > 0 and result['bits_per_dim'] is None and result['num_fit'] == 100
    assert not os.path.exists(os.path.join(paths['root'], 'out_codes'))  # --json elsewhere: out_dir untouched
    # Cached: the 32px feature classifier and CAS baseline (300 images); the 16px ones (baseline of 8 images). (The
    # folder is the session's: test_evaluate_models.py may have added 16px ones of its own.)
    assert set(cached_classifiers(paths, 32)) == {1500, NUM_SAMPLES}
    assert {1500, 8} <= set(cached_classifiers(paths, 16))


@pytest.mark.parametrize('name', list(SCRIPT_ERRORS))
def test_bad_input_through_the_script_is_one_line_and_writes_nothing(paths, runs, name):
    line = assert_one_line_error(runs[name], os.path.join(paths['root'], f'out_{name}'))
    assert SCRIPT_ERRORS[name][2] in line


def test_missing_inception_weights_say_where_to_put_them(paths, runs):
    line = runs['no_inception_weights'].stderr
    assert FID_WEIGHTS_URL in line
    assert os.path.join(paths['torch_home'], 'hub', 'checkpoints', 'pt_inception-2015-12-05-6726825d.pth') in line


@pytest.mark.parametrize('name', list(MAIN_ERRORS))
def test_bad_input_in_process_raises_before_writing(paths, name):
    samples, extra, message = MAIN_ERRORS[name]
    extra = [paths[flag[1:-1]] if flag.startswith('{') else flag for flag in extra]
    with pytest.raises(UserError) as error:
        run_main_in_process(paths, os.path.join(paths['root'], samples), name, *extra)
    assert message in str(error.value)
    assert not os.path.exists(os.path.join(paths['root'], f'out_{name}'))


def test_bad_flag_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.build_parser().parse_args(['--samples', 'x', '--features', 'pixels'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and 'invalid choice' in lines[0]


# -----------------------------------------------------------------------------
# In process

def test_sample_folder_layouts(tmp_path):
    write_pngs(str(tmp_path / 'flat'), 4)
    images, labels = read_sample_folder(str(tmp_path / 'flat'), SHAPES_INFO)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8 and labels is None
    write_pngs(str(tmp_path / 'by_index' / '2'), 2)
    write_pngs(str(tmp_path / 'by_index' / '5'), 3)
    images, labels = read_sample_folder(str(tmp_path / 'by_index'), SHAPES_INFO)
    assert labels.tolist() == [2, 2, 5, 5, 5]
    # torchvision's save_image writes grey images as RGB files with equal channels: they count as 1 channel.
    grey_info = {**SHAPES_INFO, 'name': 'fashion_mnist', 'in_channels': 1}
    grey = (np.arange(1024) % 256).astype(np.uint8).reshape(1, 32, 32)
    save_png(np.repeat(grey, 3, 0), str(tmp_path / 'g' / 'a.png'))
    images, _ = read_sample_folder(str(tmp_path / 'g'), grey_info)
    assert images.shape == (1, 1, 32, 32) and int(images[0, 0, 0, 5]) == 5


@pytest.mark.parametrize('layout, message', [
    ('bad_class', 'names no class'), ('mixed', 'both image files and subfolders'),
    ('unreadable', 'cannot read sample image'), ('grey_for_colour', 'greyscale image'),
    ('colour_for_grey', 'colour image')])
def test_bad_sample_folders(tmp_path, layout, message):
    info = SHAPES_INFO
    if layout == 'bad_class':
        write_pngs(str(tmp_path / 'hexagon'), 1)
    elif layout == 'mixed':
        write_pngs(str(tmp_path), 1)
        write_pngs(str(tmp_path / 'circle'), 1)
    elif layout == 'unreadable':
        (tmp_path / 'a.png').write_text('not an image')
    elif layout == 'grey_for_colour':
        write_pngs(str(tmp_path), 1, channels=1)
    else:
        write_pngs(str(tmp_path), 1)
        info = {**SHAPES_INFO, 'in_channels': 1}
    with pytest.raises(UserError, match=message):
        read_sample_folder(str(tmp_path), info)


def test_sample_checks():
    images = torch.zeros(5, 3, 32, 32, dtype=torch.uint8)
    check_samples(images, torch.tensor([0, 1, 2, 3, 5]), SHAPES_INFO, 'x')
    with pytest.raises(UserError, match='class labels outside'):
        check_samples(images, torch.tensor([0, 1, 2, 3, 6]), SHAPES_INFO, 'x')
    with pytest.raises(UserError, match=r'\[1, 32, 32\]'):
        check_samples(images[:, :1], None, SHAPES_INFO, 'x')


@pytest.mark.parametrize('cls', [VQVAE, VQVAE2])
def test_codes_files_decode_in_batches(tmp_path, cls):
    model = save_vq(str(tmp_path / 'vq.pth'), cls)
    shapes = [model.code_shape()] if cls is VQVAE else list(model.code_shape())
    names = ['codes'] if cls is VQVAE else ['codes_top', 'codes_bottom']
    codes = {name: torch.randint(0, 16, (5, *shape)) for name, shape in zip(names, shapes)}
    torch.save(codes, tmp_path / 'codes.pt')
    vq, data = load_vq_for_codes(read_codes_file(str(tmp_path / 'codes.pt')), 'codes.pt', str(tmp_path / 'vq.pth'),
                                 'cpu')
    assert data['image_size'] == 16
    images, labels = decode_codes_file(codes, vq, batch_size=2, device='cpu')
    with torch.no_grad():
        expected = to_uint8(model.decode_codes(*codes.values()))
    assert labels is None and torch.equal(images, expected)


def test_codes_file_errors(tmp_path):
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    with pytest.raises(UserError, match='not a readable codes.pt'):
        read_codes_file(str(tmp_path / 'junk.pt'))
    torch.save({'images': torch.zeros(1)}, tmp_path / 'other.pt')
    with pytest.raises(UserError, match='holds no codes'):
        read_codes_file(str(tmp_path / 'other.pt'))
    save_vq(str(tmp_path / 'vq.pth'), VQVAE)
    with pytest.raises(UserError, match='outside'):
        load_vq_for_codes({'codes': torch.full((2, 4, 4), 16)}, 'c.pt', str(tmp_path / 'vq.pth'), 'cpu')


def test_classifier_cache_key(tmp_path, monkeypatch):
    """Same settings: read back, not retrained; other settings: a new file."""
    settings = ClassifierSettings(epochs=1, min_steps=5, batch_size=32)
    args = ('shapes', 16, str(tmp_path), 0, str(tmp_path / 'cache'))
    test = (torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8), torch.arange(20) % 6)
    model, record = dataset_classifier(*args, settings, num_train=200, test=test)
    assert record['num_train'] == 200 and record['num_test'] == 20 and 0 <= record['test_accuracy'] <= 1

    def no_training(*a, **k):
        raise AssertionError('retrained although the cache key matched')
    monkeypatch.setattr(features, 'train_classifier', no_training)
    again, record_again = dataset_classifier(*args, settings, num_train=200, test=test)
    assert record_again == record
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    monkeypatch.undo()
    dataset_classifier(*args, ClassifierSettings(epochs=1, min_steps=6, batch_size=32), num_train=200, test=test)
    assert len(os.listdir(tmp_path / 'cache')) == 2
    probs = again.predict_proba(torch.zeros(3, 3, 16, 16, dtype=torch.uint8))
    assert probs.shape == (3, 6) and torch.allclose(probs.sum(1), torch.ones(3))


def test_outlier_images_are_shuffled_patches_joined_pairs_and_noise():
    images = to_float(load_images(build_dataset('shapes', 'test', 32, num_samples=9)[0], desc='shapes')[0])
    outliers = outlier_images(images, torch.Generator().manual_seed(0))
    assert outliers.shape == images.shape and outliers.min() >= -1 and outliers.max() <= 1
    # The first third: each image's own pixels in another order.
    for image, shuffled in zip(images[:3], outliers[:3]):
        assert not torch.equal(image, shuffled)
        assert torch.equal(image.flatten(1).sort(1).values, shuffled.flatten(1).sort(1).values)
    # The second: every pixel from one of two images, both of them present.
    for i, mixed in zip(range(3, 6), outliers[3:6]):
        a, b = images[i], images[5 if i == 3 else i - 1]
        from_a, from_b = (mixed == a).all(0), (mixed == b).all(0)
        assert (from_a | from_b).all() and (from_a & ~from_b).any() and (from_b & ~from_a).any()
    levels = (outliers[6:] + 1) * 127.5  # 8-bit pixel values of real images are whole numbers here
    assert (levels - levels.round()).abs().mean() > 0.1  # the last third: continuous noise, not pixels of an image


def test_classifier_is_confident_on_shapes_but_not_on_noise_shuffled_or_joined_shapes():
    """Without outlier exposure the classifier called uniform noise a shape with probability ~1 (a diffuse prior's
    noise samples then scored 100% confident); with it, only real-looking images are confident."""
    train, _ = build_dataset('shapes', 'train', 32, num_samples=1500)
    images, labels = load_images(train, desc='shapes')
    model = train_classifier(images, labels, 6, ClassifierSettings(epochs=1, min_steps=300, batch_size=64))
    test_images, test_labels = load_images(build_dataset('shapes', 'test', 32, num_samples=300)[0], desc='shapes')

    def confident(uint8_images):
        return float((model.predict_proba(uint8_images).max(1).values >= 0.9).float().mean())
    noise = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    made = to_uint8(outlier_images(to_float(test_images), torch.Generator().manual_seed(1)))  # shuffled, joined
    assert confident(test_images) > 0.8
    assert confident(noise) < 0.05 and confident(made[:100]) < 0.2 and confident(made[100:200]) < 0.3


def test_fid_inception_loads_a_local_weights_file_only(tmp_path):
    """The structure loads a state dict saved from itself, makes 2048 features from grey or colour images, and a
    file that is not the FID weights is refused in one line. (The real weights cannot be fetched here.)"""
    torch.manual_seed(0)
    torch.save(build_fid_inception().state_dict(), tmp_path / 'weights.pth')
    network = load_fid_inception(str(tmp_path / 'weights.pth'))
    image = torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8)
    grey = network.extract(image, batch_size=1, device='cpu')['features']
    colour = network.extract(image.expand(-1, 3, -1, -1), batch_size=1, device='cpu')['features']
    assert grey.shape == (1, 2048) and torch.allclose(grey, colour, atol=1e-5)
    torch.save({'conv.weight': torch.zeros(1)}, tmp_path / 'other.pth')
    with pytest.raises(UserError, match='is not the FID Inception weights'):
        load_fid_inception(str(tmp_path / 'other.pth'))


def test_confident_fraction_comes_from_the_dataset_classifier_in_any_feature_space():
    """With features that carry no class probabilities (Inception), the dataset classifier decides confidence."""
    class Features:
        def extract(self, images, batch_size, device, desc=''):
            return {'features': images.flatten(1).float()}

    class Classifier:
        def predict_proba(self, images, batch_size, device):
            return torch.tensor([[0.95, 0.05], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])

    args = evaluate.build_parser().parse_args(['--samples', 'x', '--confidence', '0.9', '--device', 'cpu'])
    images = torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = {'test_features': torch.randn(6, 4, generator=torch.Generator().manual_seed(1)),
                 'fid_train_vs_test': 0.0}
    scores = evaluate.score_samples(images, None, reference, Features(), args, Classifier())
    assert scores['confident_fraction'] == 0.5  # 0.95 and 0.9 reach 0.9; 0.5 and 0.8 do not
    assert 'confident_fraction' not in evaluate.score_samples(images, None, reference, Features(), args)

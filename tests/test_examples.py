"""The API walk-through in examples/ runs with tiny settings, and the per-row progress hook that stage 3's progress
bar uses is called once per finished row of every level, for both prior families and both samplers."""
import pytest
import torch

from helpers import run_in_process
from models import HierarchicalPixelCNN, HierarchicalTransformerPrior, PixelCNN, TransformerPrior


def test_the_api_example_runs_the_whole_pipeline(tmp_path, single_thread):
    out = tmp_path / 'grid.png'
    result = run_in_process(['examples/pixelcnn_prior_example.py', '--num_images', '128', '--vq_steps', '3',
                             '--prior_steps', '3', '--batch_size', '16', '--num_samples', '4', '--out', out])
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.stat().st_size > 0 and 'stage 3' in result.stdout


@pytest.mark.parametrize('cached', [True, False])
@pytest.mark.parametrize('prior', [
    PixelCNN(num_embeddings=8, embedding_dim=4, hidden_channels=8, num_layers=2),
    TransformerPrior(num_embeddings=8, embed_dim=8, num_layers=1, num_heads=2, num_kv_heads=1, max_height=6,
                     max_width=6),
    HierarchicalPixelCNN(num_embeddings=8, embedding_dim=4, hidden_channels=8, num_layers=2),
    HierarchicalTransformerPrior(num_embeddings=8, embed_dim=8, num_layers=1, num_heads=2, num_kv_heads=1,
                                 max_height=6, max_width=6),
], ids=['pixelcnn', 'transformer', 'hierarchical_pixelcnn', 'hierarchical_transformer'])
def test_on_row_is_called_once_per_finished_row_of_every_level(prior, cached, single_thread):
    shapes = {'flat': (3, 5)} if prior.levels == ('flat',) else {'top': (3, 2), 'bottom': (6, 4)}
    calls = []
    prior.sample_levels(2, shapes, generator=torch.Generator().manual_seed(0), cached=cached,
                        on_row=lambda: calls.append(1))
    assert len(calls) == sum(height for height, _ in shapes.values())

import torch

from aqlm_compile.config import AqlmConfig
from aqlm_compile.quantize.kmeans import kmeans, nearest_centroid, residual_kmeans
from aqlm_compile.quantize.layer import init_codes
from aqlm_compile.quantize.objective import layer_loss
from aqlm_compile.quantize.presets import get_preset


def test_kmeans_recovers_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 3, generator=gen) * 10
    points = centers.repeat_interleave(50, 0) + 0.01 * torch.randn(200, 3, generator=gen)
    found = kmeans(points, 4, 50, torch.Generator().manual_seed(1))
    assign = nearest_centroid(points, found)
    assert ((points - found[assign]).norm(dim=1) < 0.1).all()


def test_residual_kmeans_beats_random_init():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=gen)
    x = torch.randn(128, 512, generator=gen)
    h = x @ x.T / 512
    config = AqlmConfig.parse("2x4g8")
    codes, cb, s = init_codes(w, config, get_preset("tiny", kmeans_iters=30), torch.Generator().manual_seed(0))
    kmeans_loss = layer_loss(w, h, codes, cb, s)
    # random init: random codes and codebooks drawn from the data, same scales
    rand_codes = torch.randint(0, 16, codes.shape, generator=gen)
    groups = (w / s.view(-1, 1)).reshape(-1, 8)
    rand_cb = groups[torch.randint(0, groups.shape[0], (2, 16), generator=gen)].unsqueeze(2) / 2
    random_loss = layer_loss(w, h, rand_codes, rand_cb, s)
    assert kmeans_loss < 0.5 * random_loss


def test_residual_kmeans_more_codewords_than_points():
    pts = torch.randn(10, 4)
    cb, codes = residual_kmeans(pts, 1, 64, 5, torch.Generator().manual_seed(0))
    assert cb.shape == (1, 64, 4) and codes.shape == (10, 1)
    assert torch.allclose(cb[0][codes[:, 0]], pts)  # every point is its own centroid


def test_nearest_centroid_chunks_match_direct_distance():
    gen = torch.Generator().manual_seed(2)
    points, centroids = torch.randn(5000, 8, generator=gen), torch.randn(256, 8, generator=gen)
    direct = torch.cdist(points.double(), centroids.double()).argmin(1)
    for chunk in (256, 1 << 18, 1 << 24):  # one row a chunk, several rows, everything at once
        assert torch.equal(nearest_centroid(points, centroids, chunk), direct)

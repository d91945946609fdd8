"""Image spaces: pixel identity, and a tiny AutoencoderKL loaded from a folder with SD3's latent
normalisation applied and inverted exactly; latents cached once per image key."""

import pytest
import torch
from diffusers import AutoencoderKL

from base_model.vae import LatentSpace, PixelSpace, image_space

torch.set_num_threads(1)  # other torch jobs may share the two cores

SCALE, SHIFT = 1.5305, 0.0609  # SD3's


def tiny_vae(**overrides):
    kw = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
              latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=SCALE, shift_factor=SHIFT)
    torch.manual_seed(0)
    return AutoencoderKL(**{**kw, **overrides}).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(path)
    return str(path)


def images(n=3, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_latent_space_normalises_as_sd3(vae_dir):
    space = LatentSpace(vae_dir)
    ref = AutoencoderKL.from_pretrained(vae_dir).eval()
    assert (space.channels, space.downsample) == (4, 2)
    assert (space.scaling_factor, space.shift_factor) == (SCALE, SHIFT)
    assert not space.vae.training and not any(p.requires_grad for p in space.vae.parameters())
    x = images()
    z = space.encode(x)
    assert z.shape == (3, 4, 8, 8)
    with torch.no_grad():
        mean = ref.encode(x).latent_dist.mean
        torch.testing.assert_close(z, (mean - SHIFT) * SCALE)
        torch.testing.assert_close(space.decode(z), ref.decode(mean).sample, atol=1e-5, rtol=1e-5)


def test_sampled_latents_use_the_generator(vae_dir):
    ref = AutoencoderKL.from_pretrained(vae_dir).eval()
    x = images()
    z = LatentSpace(vae_dir, sample=True, generator=torch.Generator().manual_seed(1)).encode(x)
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, (expected - SHIFT) * SCALE)
    assert not torch.allclose(z, LatentSpace(vae_dir).encode(x))  # a sample is not the mean


def test_missing_shift_factor_means_zero(tmp_path):
    tiny_vae(shift_factor=None, scaling_factor=0.18215).save_pretrained(tmp_path)  # an SD1-style VAE
    space = LatentSpace(str(tmp_path))
    assert space.shift_factor == 0.0
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(space.encode(x), space.vae.encode(x).latent_dist.mean * 0.18215)


def test_encode_cached_encodes_each_key_once(vae_dir, monkeypatch):
    space = LatentSpace(vae_dir)
    encoded = []  # batch sizes that reached the VAE
    real = space.encode
    monkeypatch.setattr(space, "encode", lambda x: encoded.append(len(x)) or real(x))
    x = images(3)
    z = space.encode_cached(["a", "b", "a"], x[[0, 1, 0]])
    assert encoded == [2]  # the repeated key once
    z2 = space.encode_cached(["b", "c"], x[[1, 2]])
    assert encoded == [2, 1]  # only the new key
    space.encode_cached(["c", "a", "b"], x[[2, 0, 1]])
    assert encoded == [2, 1]
    direct = real(x)
    torch.testing.assert_close(z, direct[[0, 1, 0]], atol=1e-6, rtol=0)
    torch.testing.assert_close(z2, direct[[1, 2]], atol=1e-6, rtol=0)
    assert set(space.cache) == {"a", "b", "c"}


def test_pixel_space_is_identity():
    space = image_space("pixels")
    assert isinstance(space, PixelSpace) and (space.channels, space.downsample) == (3, 1)
    x = images()
    assert torch.equal(space.encode(x), x) and torch.equal(space.decode(x), x)
    assert torch.equal(space.encode_cached([0, 1, 2], x), x) and set(space.cache) == {0, 1, 2}


def test_spec_and_missing_path_errors(tmp_path, vae_dir):
    assert isinstance(image_space(f"vae:{vae_dir}"), LatentSpace)
    missing = str(tmp_path / "no_vae_here")
    with pytest.raises(FileNotFoundError, match="no_vae_here.*config.json"):
        LatentSpace(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        image_space(f"vae:{tmp_path}")  # exists, but empty
    with pytest.raises(ValueError, match="pixels"):
        image_space("latents")

import pytest
import torch

from lightning_fisher.sparse.format import (
    check_nm,
    code_bits,
    compress,
    decompress,
    from_reduction_matrix,
    gather_kept,
    nm_violation,
    pack_codes,
    packed_columns,
    parse_nm,
    to_reduction_matrix,
    unpack_codes,
    validate_nm,
)


def test_weights_1_to_8_under_2_4_by_hand():
    # the 2 largest of each group of 4 survive: [0 0 3 4 | 0 0 7 8]
    weight = torch.tensor([[0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]])
    packed = compress(weight, 2, 4)
    assert packed.values.tolist() == [[3.0, 4.0, 7.0, 8.0]]
    # positions (2, 3) and (2, 3): byte = 2 | 3 << 2 | 2 << 4 | 3 << 6 = 2 + 12 + 32 + 192 = 238
    assert packed.codes.dtype == torch.uint8
    assert packed.codes.tolist() == [[238]]
    assert torch.equal(packed.to_dense(), weight)


def test_code_layout_of_a_mixed_row_by_hand():
    # group 0 keeps positions (0, 3), group 1 (1, 2), group 2 (0, 1): three groups, six codes, two bytes
    weight = torch.tensor([[5.0, 0, 0, 6, 0, 7, 8, 0, 9, 1, 0, 0]])
    packed = compress(weight, 2, 4)
    assert packed.values.tolist() == [[5.0, 6, 7, 8, 9, 1]]
    first = 0 | 3 << 2 | 1 << 4 | 2 << 6  # 140
    second = 0 | 1 << 2  # 4: the unused high bits of the last byte are zero
    assert packed.codes.tolist() == [[first, second]]


def test_groups_with_fewer_than_n_nonzeros_keep_their_lowest_zeros():
    weight = torch.tensor([[0.0, 0, 0, 0, 0, 0, 0, 2.0]])
    packed = compress(weight, 2, 4)
    assert unpack_codes(packed.codes, 2, 4).tolist() == [[0, 1, 0, 3]]
    assert packed.values.tolist() == [[0.0, 0.0, 0.0, 2.0]]
    assert torch.equal(packed.to_dense(), weight)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (1, 3), (3, 8), (5, 16), (2, 20)])
@pytest.mark.parametrize("shape", [(7, 40, 3, 3), (13, 80)])
def test_round_trip_is_exact(make_nm, shape, n, m):
    if shape[1] % m:
        shape = (shape[0], m * 3, *shape[2:])
    weight = make_nm(shape, n, m)
    packed = compress(weight, n, m)
    rows, k = to_reduction_matrix(weight).shape
    assert packed.values.shape == (rows, k * n // m)
    assert packed.codes.shape == (rows, packed_columns(k * n // m, code_bits(m)))
    restored = packed.to_dense()
    assert restored.shape == weight.shape
    assert torch.equal(restored.view(torch.int32), weight.view(torch.int32))  # bitwise


def test_code_bits():
    assert [code_bits(m) for m in (2, 3, 4, 5, 8, 9, 16, 17, 256)] == [1, 2, 2, 4, 4, 4, 4, 8, 8]
    with pytest.raises(ValueError, match="at most 256"):
        code_bits(257)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits):
    positions = torch.randint(0, 1 << bits, (5, 11), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(positions, bits)
    assert packed.shape == (5, packed_columns(11, bits))
    assert torch.equal(unpack_codes(packed, bits, 11), positions)


def test_conv_reduction_order_is_kh_kw_cin():
    weight = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).reshape(2, 4, 3, 3)
    matrix = to_reduction_matrix(weight)
    # column (kh, kw, c) = (kh * 3 + kw) * 4 + c
    assert matrix[1, (2 * 3 + 1) * 4 + 3] == weight[1, 3, 2, 1]
    assert torch.equal(from_reduction_matrix(matrix, weight.shape), weight)


def test_decompress_is_differentiable_in_the_kept_values_only(make_nm):
    weight = make_nm((4, 8), 2, 4)
    packed = compress(weight, 2, 4)
    values = packed.values.clone().requires_grad_()
    upstream = torch.randn(4, 8)
    (decompress(values, packed.codes, 2, 4, (4, 8)) * upstream).sum().backward()
    assert torch.equal(values.grad, gather_kept(upstream, packed.codes, 2, 4))
    assert torch.equal(gather_kept(weight, packed.codes, 2, 4), packed.values)


def test_error_names_the_first_bad_group():
    weight = torch.ones(3, 8)
    weight[0] = torch.tensor([1.0, 0, 0, 1, 0, 0, 1, 1])
    weight[1] = torch.tensor([1.0, 1, 0, 0, 1, 1, 1, 0])  # group 1 of row 1 holds 3
    with pytest.raises(ValueError, match=r"not 2:4: row 1, group 1 \(reduction columns 4\.\.7\) holds 3 non-zeros"):
        validate_nm(weight, 2, 4)
    with pytest.raises(ValueError, match=r"row 1, group 1"):
        compress(weight, 2, 4)


def test_conv_error_names_kernel_position_and_channels():
    weight = torch.zeros(2, 8, 3, 3)
    weight[1, 4:7, 2, 1] = 1.0  # three non-zeros among channels 4..7 at kernel position (2, 1)
    message = nm_violation(weight, 2, 4)
    assert message is not None
    assert "row 1" in message and "kernel position (2, 1), input channels 4..7" in message and "holds 3" in message


def test_nan_counts_as_nonzero():
    weight = torch.tensor([[float("nan"), 1.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="holds 3 non-zeros"):
        validate_nm(weight, 2, 4)


def test_shape_errors():
    with pytest.raises(ValueError, match="size 6 is not a multiple of M=4"):
        validate_nm(torch.zeros(2, 6), 2, 4)
    with pytest.raises(ValueError, match="must be 2-D"):
        compress(torch.zeros(2, 4, 4), 2, 4)


@pytest.mark.parametrize(
    "text,match",
    [("2-4", "must be 'N:M'"), ("4:4", "0 < n < m"), ("0:4", "0 < n < m"), ("1:300", "at most 256"), (24, "'N:M'")],
)
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_nm(text)


def test_parse_and_check():
    assert parse_nm(" 2:4 ") == (2, 4)
    with pytest.raises(ValueError, match="integers"):
        check_nm(2.0, 4)

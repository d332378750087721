-- functional.lua: fa.F, the stateless ops (PyTorch's torch.nn.functional). Each forward function checks
-- its arguments (errors name the function, the argument, what was expected and what came), allocates its
-- output and makes one C call. Dims are 1-based and may be negative (-1 = the last), as everywhere in fa.
--
--   F.linear(input, weight, bias)                       F.conv2d(input, weight, bias, stride, padding, dilation, groups)
--   F.layer_norm(input, normalized_shape, weight, bias, eps) -> out, mean, rstd
--   F.softmax(input, dim), F.log_softmax(input, dim)    F.gelu, F.relu, F.tanh, F.sigmoid (input)
--   F.dropout(input, p, training) -> out, mask          F.grid_sample(input, grid, {padding_mode=, align_corners=})
--   F.mse_loss(input, target, reduction)                F.cross_entropy(input, target, {ignore_index=, label_smoothing=, reduction=})
--
-- Class targets (cross_entropy, nn.CrossEntropyCriterion) are 1-based class indices, as Torch7's and as
-- Tensor:argmax returns them; ignore_index (default -100) is compared with the targets as given.
--
-- The backward entry points mirror the C API (outputs first; input gradients are overwritten, parameter
-- gradients ACCUMULATED; nil = not needed): F.linear_backward(gradInput, gradWeight, gradBias, gradOutput,
-- input, weight), F.conv2d_backward(..., params), F.layer_norm_backward, F.softmax_backward,
-- F.unary_backward, F.dropout_backward, F.grid_sample_backward, F.mse_loss_backward,
-- F.cross_entropy_backward. The *_forward variants take the output tensors first; nn modules use them to
-- reuse their buffers.
local ffi = require 'ffi'
local fa = require 'fastattn'
local C = fa.C

local F = {}

---------------------------------------------------------------------------- argument checks
local function shape_str(x) return fa._shape_str(x, 'x') end

local function fail(fn, fmt, ...)
  error(fn .. ': ' .. string.format(fmt, ...), 3)
end

local function tensor_arg(fn, name, x, optional)
  if x == nil and optional then return end
  if not fa.isTensor(x) then
    error(string.format("%s: argument '%s': expected a tensor, got %s", fn, name, type(x)), 3)
  end
end

local function float_arg(fn, name, x)
  if x.desc.dtype > 3 then
    error(string.format("%s: argument '%s': expected a floating-point tensor, got %s", fn, name, x:dtype()), 3)
  end
end

local function same_place(fn, name, x, ref, refname)
  if x.desc.device ~= ref.desc.device then
    error(string.format("%s: argument '%s': expected a tensor on %s (as '%s'), got %s", fn, name, ref:device(),
          refname, x:device()), 3)
  end
  if x.desc.dtype ~= ref.desc.dtype then
    error(string.format("%s: argument '%s': expected dtype %s (as '%s'), got %s", fn, name, ref:dtype(),
          refname, x:dtype()), 3)
  end
end

local function new_like(shape, x) return fa.empty(shape, { dtype = x.desc.dtype, device = x.desc.device }) end

-- a 1-based dim (negative counts from the end) -> 0-based, or an error naming fn
local function dim0(fn, x, dim)
  local n = x:dim()
  dim = dim or -1
  if type(dim) ~= 'number' or dim ~= math.floor(dim) or dim == 0 or dim > n or dim < -n then
    error(string.format("%s: argument 'dim': expected a dimension in 1..%d (or -%d..-1), got %s", fn, n, n,
          tostring(dim)), 3)
  end
  return dim < 0 and n + dim or dim - 1
end

local REDUCTION = { none = 0, mean = 1, sum = 2 }
local function reduction_id(fn, r)
  if r == nil then return 1 end
  if r == true then return 1 end  -- Torch7's sizeAverage = true
  if r == false then return 2 end
  local id = REDUCTION[r]
  if not id then
    error(string.format("%s: argument 'reduction': expected 'none', 'mean' or 'sum', got %s", fn, tostring(r)), 3)
  end
  return id
end
F._reduction_id = reduction_id
F._dim0 = dim0

---------------------------------------------------------------------------- linear
-- input (..., in), weight (out, in), bias (out) or nil -> (..., out)
local function check_linear(fn, input, weight, bias)
  tensor_arg(fn, 'input', input)
  tensor_arg(fn, 'weight', weight)
  tensor_arg(fn, 'bias', bias, true)
  if weight:dim() ~= 2 then fail(fn, "argument 'weight': expected a 2-D tensor (out, in), got size %s", shape_str(weight)) end
  if input:dim() < 1 or input:size(-1) ~= weight:size(2) then
    fail(fn, "argument 'input': expected size (..., %d), got %s", weight:size(2), shape_str(input))
  end
  if bias and (bias:dim() ~= 1 or bias:size(1) ~= weight:size(1)) then
    fail(fn, "argument 'bias': expected size %d, got %s", weight:size(1), shape_str(bias))
  end
end
F._check_linear = check_linear

function F.linear_forward(out, input, weight, bias)
  fa.check(C.fa_linear_forward(out.desc, input.desc, weight.desc, bias and bias.desc or nil), 2)
  return out
end
function F.linear_backward(gradInput, gradWeight, gradBias, gradOutput, input, weight)
  fa.check(C.fa_linear_backward(gradInput and gradInput.desc or nil, gradWeight and gradWeight.desc or nil,
    gradBias and gradBias.desc or nil, gradOutput.desc, input.desc, weight.desc), 2)
  return gradInput
end
function F.linear(input, weight, bias)
  check_linear('fa.F.linear', input, weight, bias)
  local shape = input:size()
  shape[#shape] = weight:size(1)
  return F.linear_forward(new_like(shape, input), input:contiguous(), weight, bias)
end

---------------------------------------------------------------------------- conv2d
local function pair(fn, name, v, default)
  if v == nil then return default, default end
  if type(v) == 'number' then return v, v end
  if type(v) == 'table' and type(v[1]) == 'number' then return v[1], v[2] or v[1] end
  error(string.format("%s: argument '%s': expected a number or {h, w}, got %s", fn, name, tostring(v)), 4)
end

-- F.conv2d_params(fn, kh, kw, stride, padding, dilation, groups) -> fa_conv2d_params (padding may be 'valid'
-- or, for odd effective kernels, 'same')
function F.conv2d_params(fn, kh, kw, stride, padding, dilation, groups)
  local p = ffi.new('fa_conv2d_params')
  p.stride_h, p.stride_w = pair(fn, 'stride', stride, 1)
  p.dilation_h, p.dilation_w = pair(fn, 'dilation', dilation, 1)
  if padding == 'valid' then padding = 0 end
  if padding == 'same' then
    local eh, ew = p.dilation_h * (kh - 1), p.dilation_w * (kw - 1)
    if eh % 2 ~= 0 or ew % 2 ~= 0 or p.stride_h ~= 1 or p.stride_w ~= 1 then
      error(fn .. ": padding 'same' needs stride 1 and an odd effective kernel size", 3)
    end
    padding = { eh / 2, ew / 2 }
  end
  p.pad_h, p.pad_w = pair(fn, 'padding', padding, 0)
  p.groups = groups or 1
  if p.stride_h < 1 or p.stride_w < 1 or p.dilation_h < 1 or p.dilation_w < 1 or p.pad_h < 0 or p.pad_w < 0
     or p.groups < 1 then
    error(string.format('%s: expected stride >= 1, dilation >= 1, padding >= 0, groups >= 1, got stride %dx%d, ' ..
      'padding %dx%d, dilation %dx%d, groups %d', fn, p.stride_h, p.stride_w, p.pad_h, p.pad_w, p.dilation_h,
      p.dilation_w, p.groups), 3)
  end
  return p
end

-- the output size of a conv2d, after checking the shapes; fn names the caller in errors
function F.conv2d_output_size(fn, input, weight, bias, p)
  tensor_arg(fn, 'input', input)
  tensor_arg(fn, 'weight', weight)
  tensor_arg(fn, 'bias', bias, true)
  if weight:dim() ~= 4 then fail(fn, "argument 'weight': expected a 4-D tensor (out, in/groups, kh, kw), got size %s", shape_str(weight)) end
  local O, Cg, kh, kw = weight:size(1), weight:size(2), weight:size(3), weight:size(4)
  local g = p.groups
  if input:dim() ~= 4 or input:size(2) ~= Cg * g then
    fail(fn, "argument 'input': expected size (N, %d, H, W), got %s", Cg * g, shape_str(input))
  end
  if O % g ~= 0 then fail(fn, 'out channels %d not divisible by groups %d', O, g) end
  if bias and (bias:dim() ~= 1 or bias:size(1) ~= O) then
    fail(fn, "argument 'bias': expected size %d, got %s", O, shape_str(bias))
  end
  local H, W = input:size(3), input:size(4)
  local Ho = math.floor((H + 2 * p.pad_h - p.dilation_h * (kh - 1) - 1) / p.stride_h) + 1
  local Wo = math.floor((W + 2 * p.pad_w - p.dilation_w * (kw - 1) - 1) / p.stride_w) + 1
  if Ho < 1 or Wo < 1 then
    fail(fn, "argument 'input': size %s is smaller than the (dilated) kernel %dx%d with padding %dx%d", shape_str(input),
         p.dilation_h * (kh - 1) + 1, p.dilation_w * (kw - 1) + 1, p.pad_h, p.pad_w)
  end
  return { input:size(1), O, Ho, Wo }
end

function F.conv2d_forward(out, input, weight, bias, p)
  fa.check(C.fa_conv2d_forward(out.desc, input.desc, weight.desc, bias and bias.desc or nil, p), 2)
  return out
end
function F.conv2d_backward(gradInput, gradWeight, gradBias, gradOutput, input, weight, p)
  fa.check(C.fa_conv2d_backward(gradInput and gradInput.desc or nil, gradWeight and gradWeight.desc or nil,
    gradBias and gradBias.desc or nil, gradOutput.desc, input.desc, weight.desc, p), 2)
  return gradInput
end

-- F.conv2d(input, weight, bias, stride, padding, dilation, groups) as PyTorch's, or
-- F.conv2d(input, weight, bias, {stride=, padding=, dilation=, groups=})
function F.conv2d(input, weight, bias, stride, padding, dilation, groups)
  local fn = 'fa.F.conv2d'
  if type(stride) == 'table' and (stride.stride or stride.padding or stride.dilation or stride.groups) then
    local o = stride
    stride, padding, dilation, groups = o.stride, o.padding, o.dilation, o.groups
  end
  tensor_arg(fn, 'weight', weight)
  if weight:dim() ~= 4 then fail(fn, "argument 'weight': expected a 4-D tensor (out, in/groups, kh, kw), got size %s", shape_str(weight)) end
  local p = F.conv2d_params(fn, weight:size(3), weight:size(4), stride, padding, dilation, groups)
  local shape = F.conv2d_output_size(fn, input, weight, bias, p)
  return F.conv2d_forward(new_like(shape, input), input, weight, bias, p)
end

---------------------------------------------------------------------------- layer_norm
-- normalized_shape: a number or a table of the trailing sizes; returns the product
local function norm_size(fn, input, normalized_shape)
  local ns = type(normalized_shape) == 'number' and { normalized_shape } or normalized_shape
  if type(ns) ~= 'table' then
    error(string.format("%s: argument 'normalized_shape': expected a size or a table of sizes, got %s", fn,
          type(normalized_shape)), 4)
  end
  local n, d = 1, input:dim()
  local ok = #ns <= d
  for i = 1, #ns do
    n = n * ns[i]
    if ok and input:size(d - #ns + i) ~= ns[i] then ok = false end
  end
  if not ok then
    error(string.format("%s: argument 'input': expected size (..., %s) (normalized_shape), got %s", fn,
          table.concat(ns, ', '), shape_str(input)), 4)
  end
  return n
end
F._norm_size = norm_size

function F.layer_norm_forward(out, mean, rstd, input, weight, bias, n, eps)
  fa.check(C.fa_layernorm_forward(out.desc, mean.desc, rstd.desc, input.desc, weight and weight.desc or nil,
    bias and bias.desc or nil, n, eps), 2)
  return out, mean, rstd
end
function F.layer_norm_backward(gradInput, gradWeight, gradBias, gradOutput, input, mean, rstd, weight, n)
  fa.check(C.fa_layernorm_backward(gradInput and gradInput.desc or nil, gradWeight and gradWeight.desc or nil,
    gradBias and gradBias.desc or nil, gradOutput.desc, input.desc, mean.desc, rstd.desc,
    weight and weight.desc or nil, n), 2)
  return gradInput
end
-- the dtype of the saved statistics: float64 for float64 input, float32 otherwise
function F._stat_dtype(x) return x.desc.dtype == 1 and 1 or 0 end

-- F.layer_norm(input, normalized_shape, weight, bias, eps = 1e-5) -> output, mean, rstd
function F.layer_norm(input, normalized_shape, weight, bias, eps)
  local fn = 'fa.F.layer_norm'
  tensor_arg(fn, 'input', input)
  tensor_arg(fn, 'weight', weight, true)
  tensor_arg(fn, 'bias', bias, true)
  local n = norm_size(fn, input, normalized_shape)
  if weight and weight:numel() ~= n then fail(fn, "argument 'weight': expected %d elements, got size %s", n, shape_str(weight)) end
  if bias and bias:numel() ~= n then fail(fn, "argument 'bias': expected %d elements, got size %s", n, shape_str(bias)) end
  local rows = n > 0 and input:numel() / n or 0
  local sd = { dtype = F._stat_dtype(input), device = input.desc.device }
  local mean, rstd = fa.empty({ rows }, sd), fa.empty({ rows }, sd)
  return F.layer_norm_forward(new_like(input:size(), input), mean, rstd, input, weight, bias, n, eps or 1e-5)
end

---------------------------------------------------------------------------- softmax
function F.softmax_forward(out, input, d0, log)
  fa.check(C.fa_softmax_forward(out.desc, input.desc, d0, log and 1 or 0), 2)
  return out
end
function F.softmax_backward(gradInput, gradOutput, output, d0, log)
  fa.check(C.fa_softmax_backward(gradInput.desc, gradOutput.desc, output.desc, d0, log and 1 or 0), 2)
  return gradInput
end
-- F.softmax(input, dim = -1)
function F.softmax(input, dim)
  tensor_arg('fa.F.softmax', 'input', input)
  local d = dim0('fa.F.softmax', input, dim)
  return F.softmax_forward(new_like(input:size(), input), input, d, false)
end
function F.log_softmax(input, dim)
  tensor_arg('fa.F.log_softmax', 'input', input)
  local d = dim0('fa.F.log_softmax', input, dim)
  return F.softmax_forward(new_like(input:size(), input), input, d, true)
end

---------------------------------------------------------------------------- activations
local UNARY = fa.UNARY
F.UNARY = UNARY
function F.unary_forward(op, out, input)
  fa.check(C.fa_unary_forward(op, out.desc, input.desc), 2)
  return out
end
-- gradInput = f'(input) * gradOutput; output is the forward output (some ops use it)
function F.unary_backward(op, gradInput, gradOutput, input, output)
  fa.check(C.fa_unary_backward(op, gradInput.desc, gradOutput.desc, input and input.desc or nil,
    output and output.desc or nil), 2)
  return gradInput
end
for _, name in ipairs({ 'gelu', 'relu', 'tanh', 'sigmoid' }) do
  local op, fn = UNARY[name], 'fa.F.' .. name
  F[name] = function(input)
    tensor_arg(fn, 'input', input)
    return F.unary_forward(op, new_like(input:size(), input), input)
  end
end

---------------------------------------------------------------------------- dropout
-- draws the mask from fa's RNG stream (fa.manualSeed makes it reproducible)
function F.dropout_forward(out, mask, input, p)
  local seed, off = fa._rng_take(input:numel())
  fa.check(C.fa_dropout_forward(out.desc, mask.desc, input.desc, p, seed, off), 2)
  return out, mask
end
function F.dropout_backward(gradInput, gradOutput, mask, p)
  fa.check(C.fa_dropout_backward(gradInput.desc, gradOutput.desc, mask.desc, p), 2)
  return gradInput
end
function F._check_p(fn, p)
  if type(p) ~= 'number' or p < 0 or p > 1 then
    error(string.format("%s: argument 'p': expected a probability in [0, 1], got %s", fn, tostring(p)), 3)
  end
end
-- F.dropout(input, p = 0.5, training = true) -> output, mask (mask nil when nothing is dropped: then the
-- output is the input itself)
function F.dropout(input, p, training)
  local fn = 'fa.F.dropout'
  tensor_arg(fn, 'input', input)
  p = p or 0.5
  F._check_p(fn, p)
  if training == false or p == 0 then return input, nil end
  local mask = fa.empty(input:size(), { dtype = 'bool', device = input.desc.device })
  local out = new_like(input:size(), input)
  if p == 1 then
    mask:zero()
    return out:zero(), mask
  end
  return F.dropout_forward(out, mask, input, p)
end

---------------------------------------------------------------------------- grid_sample
local PADDING = { zeros = 0, border = 1 }
-- opts: {mode='bilinear', padding_mode='zeros'|'border', align_corners=false} -> padding id, align_corners
function F._grid_sample_opts(fn, opts)
  opts = opts or {}
  if opts.mode ~= nil and opts.mode ~= 'bilinear' then
    error(string.format("%s: argument 'mode': only 'bilinear' is supported, got %s", fn, tostring(opts.mode)), 3)
  end
  local pm = opts.padding_mode or 'zeros'
  local pad = PADDING[pm]
  if not pad then
    error(string.format("%s: argument 'padding_mode': expected 'zeros' or 'border', got %s", fn, tostring(pm)), 3)
  end
  return pad, opts.align_corners and 1 or 0
end

function F.grid_sample_check(fn, input, grid)
  tensor_arg(fn, 'input', input)
  tensor_arg(fn, 'grid', grid)
  if input:dim() ~= 4 then fail(fn, "argument 'input': expected a 4-D tensor (N, C, H, W), got size %s", shape_str(input)) end
  if grid:dim() ~= 4 or grid:size(4) ~= 2 or grid:size(1) ~= input:size(1) then
    fail(fn, "argument 'grid': expected size (%d, Ho, Wo, 2), got %s", input:size(1), shape_str(grid))
  end
  same_place(fn, 'grid', grid, input, 'input')
  return { input:size(1), input:size(2), grid:size(2), grid:size(3) }
end

function F.grid_sample_forward(out, input, grid, pad, ac)
  fa.check(C.fa_grid_sample_forward(out.desc, input.desc, grid.desc, pad, ac), 2)
  return out
end
function F.grid_sample_backward(gradInput, gradGrid, gradOutput, input, grid, pad, ac)
  fa.check(C.fa_grid_sample_backward(gradInput and gradInput.desc or nil, gradGrid and gradGrid.desc or nil,
    gradOutput.desc, input.desc, grid.desc, pad, ac), 2)
  return gradInput, gradGrid
end

-- F.grid_sample(input, grid, {padding_mode = 'zeros', align_corners = false}) or PyTorch's positional
-- F.grid_sample(input, grid, mode, padding_mode, align_corners); bilinear only.
-- input (N, C, H, W), grid (N, Ho, Wo, 2) with (x, y) in [-1, 1] -> (N, C, Ho, Wo)
function F.grid_sample(input, grid, mode, padding_mode, align_corners)
  local fn = 'fa.F.grid_sample'
  local opts = type(mode) == 'table' and mode or { mode = mode, padding_mode = padding_mode, align_corners = align_corners }
  local pad, ac = F._grid_sample_opts(fn, opts)
  local shape = F.grid_sample_check(fn, input, grid)
  return F.grid_sample_forward(new_like(shape, input), input, grid, pad, ac)
end
fa.grid_sample = F.grid_sample

---------------------------------------------------------------------------- losses
function F.mse_loss_forward(loss, input, target, red)
  fa.check(C.fa_mse_forward(loss.desc, input.desc, target.desc, red), 2)
  return loss
end
function F.mse_loss_backward(gradInput, gradLoss, input, target, red)
  fa.check(C.fa_mse_backward(gradInput.desc, gradLoss.desc, input.desc, target.desc, red), 2)
  return gradInput
end
function F._check_mse(fn, input, target)
  tensor_arg(fn, 'input', input)
  tensor_arg(fn, 'target', target)
  if not input:isSameSizeAs(target) then
    fail(fn, "argument 'target': expected size %s (as the input), got %s", shape_str(input), shape_str(target))
  end
  same_place(fn, 'target', target, input, 'input')
end
-- F.mse_loss(input, target, reduction = 'mean') -> a 0-D tensor (mean, sum) or input's shape (none)
function F.mse_loss(input, target, reduction)
  local fn = 'fa.F.mse_loss'
  F._check_mse(fn, input, target)
  local red = reduction_id(fn, reduction)
  local loss = new_like(red == 0 and input:size() or {}, input)
  return F.mse_loss_forward(loss, input, target, red)
end

-- target checks for cross_entropy; returns the shape of an unreduced loss
function F._check_cross_entropy(fn, input, target)
  tensor_arg(fn, 'input', input)
  tensor_arg(fn, 'target', target)
  float_arg(fn, 'input', input)
  if input:dim() < 2 then fail(fn, "argument 'input': expected size (N, C) or (N, C, d1, ...), got %s", shape_str(input)) end
  local want = input:size()
  table.remove(want, 2)
  local ok = target:dim() == #want
  for i = 1, #want do ok = ok and target:size(i) == want[i] end
  if not ok then
    fail(fn, "argument 'target': expected size %s (input's size without the class dim), got %s",
         table.concat(want, 'x'), shape_str(target))
  end
  if target.desc.dtype ~= fa.dtypes.int64 then
    fail(fn, "argument 'target': expected int64 class indices (1-based), got %s", target:dtype())
  end
  if target.desc.device ~= input.desc.device then
    fail(fn, "argument 'target': expected a tensor on %s (as 'input'), got %s", input:device(), target:device())
  end
  return want
end

-- 1-based targets -> 0-based, into buf (reused when given)
function F._targets0(target, buf)
  buf = buf and buf.desc.device == target.desc.device and buf:resize(target:size())
        or fa.empty(target:size(), { dtype = 'int64', device = target.desc.device })
  fa.check(C.fa_scale_forward(buf.desc, target.desc, 1, -1), 2)
  return buf
end

function F.cross_entropy_forward(loss, input, target0, ignore_index, smoothing, red)
  fa.check(C.fa_cross_entropy_forward(loss.desc, input.desc, target0.desc, ignore_index - 1, smoothing, red), 2)
  return loss
end
function F.cross_entropy_backward(gradInput, gradLoss, input, target0, ignore_index, smoothing, red)
  fa.check(C.fa_cross_entropy_backward(gradInput.desc, gradLoss.desc, input.desc, target0.desc, ignore_index - 1,
    smoothing, red), 2)
  return gradInput
end

function F._cross_entropy_opts(fn, opts)
  opts = opts or {}
  local ls = opts.label_smoothing or 0
  if type(ls) ~= 'number' or ls < 0 or ls > 1 then
    error(string.format("%s: argument 'label_smoothing': expected a number in [0, 1], got %s", fn, tostring(ls)), 3)
  end
  local ii = opts.ignore_index or -100
  if type(ii) ~= 'number' then
    error(string.format("%s: argument 'ignore_index': expected an integer, got %s", fn, tostring(ii)), 3)
  end
  return ii, ls, reduction_id(fn, opts.reduction)
end

-- F.cross_entropy(input, target, {ignore_index = -100, label_smoothing = 0, reduction = 'mean'})
-- input (N, C) or (N, C, d1, ...) logits, target int64 1-based class indices (N) or (N, d1, ...)
-- -> a 0-D tensor (mean, sum) or target's shape (none)
function F.cross_entropy(input, target, opts)
  local fn = 'fa.F.cross_entropy'
  if type(opts) == 'string' then opts = { reduction = opts } end
  local ii, ls, red = F._cross_entropy_opts(fn, opts)
  local want = F._check_cross_entropy(fn, input, target)
  local loss = new_like(red == 0 and want or {}, input)
  return F.cross_entropy_forward(loss, input, F._targets0(target), ii, ls, red)
end

package.loaded['fastattn.functional'] = F
return F

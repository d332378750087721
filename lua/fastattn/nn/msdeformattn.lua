-- msdeformattn.lua: nn.MSDeformAttn, Deformable DETR's multi-scale deformable attention layer
-- (models/ops/modules/ms_deform_attn.py of fundamentalvision/Deformable-DETR), on fa.msda.
--
--   m = nn.MSDeformAttn{d_model = 256, n_levels = 4, n_heads = 8, n_points = 4}
--   out = m:forward{query, reference_points, input_flatten, spatial_shapes, level_start_index,
--                   input_padding_mask}
--   gradQuery, gradReferencePoints, gradInputFlatten = unpack(m:backward(input, gradOutput))
--
-- query (N, Lq, C), reference_points (N, Lq, L, 2) as normalised (x, y) or (N, Lq, L, 4) as boxes
-- (cx, cy, w, h), input_flatten (N, S, C), spatial_shapes (L, 2) int64 (H, W) per level (a tensor on any
-- device or a Lua table {{H, W}, ...}), level_start_index (L) int64 (or nil: computed from the shapes),
-- input_padding_mask (N, S) bool (true = padding) or nil  ->  output (N, Lq, C).
-- The input may also be given with these names as keys ({query = q, reference_points = r, ...}).
--
-- The data flow is the reference's:
--   value = value_proj(input_flatten), zero where input_padding_mask is true, viewed (N, S, M, C/M)
--   offsets = sampling_offsets(query) (N, Lq, M, L, P, 2)
--   A = softmax over L*P of attention_weights(query) (N, Lq, M, L, P)
--   loc = ref + offsets / (W_l, H_l)                      (2-d reference points)
--   loc = ref_xy + offsets / P * ref_wh * 0.5             (4-d reference points)
--   output = output_proj(fa.msda(value, spatial_shapes, level_start_index, loc, A))
-- Parameters, named as the reference's state_dict: sampling_offsets.{weight,bias},
-- attention_weights.{weight,bias}, value_proj.{weight,bias}, output_proj.{weight,bias}; initialised as the
-- reference's _reset_parameters (the offset bias is a radial grid of n_heads directions, point i scaled by
-- i + 1; attention weights zero; xavier-uniform value/output projections with zero biases). backward
-- returns {gradQuery, gradReferencePoints, gradInputFlatten} (the shapes, start index and mask get no
-- gradient) and adds the parameter gradients. Every intermediate lives in a buffer kept by the module
-- and reused by the next call of the same size. The same code runs on the CPU and, after :cuda(), on
-- the GPU (every op dispatches on the tensors' device); spatial shapes are read on the host.
local ffi = require 'ffi'
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'
local msda = require 'fastattn.msda'
local C = fa.C

local MSDeformAttn = nn.class('MSDeformAttn', nn.Module)

local NAME = 'MSDeformAttn'
local ADD, MUL = 0, 2 -- fa_binary_op

local function fail(fmt, ...) error(NAME .. ': ' .. string.format(fmt, ...), 0) end
local function shape_str(x) return fa._shape_str(x, 'x') end

-- float32 rounding, so that the default initialisation is the reference's float32 arithmetic bit for bit
local f32 = ffi.new('float[1]')
local function round32(v) f32[0] = v; return tonumber(f32[0]) end

function MSDeformAttn:__init(opts)
  nn.Module.__init(self)
  if opts ~= nil and type(opts) ~= 'table' then
    fail("expected a table {d_model=, n_levels=, n_heads=, n_points=}, got %s", type(opts))
  end
  opts = opts or {}
  local function int_opt(name, default)
    local v = opts[name]
    if v == nil then v = default end
    if type(v) ~= 'number' or v < 1 or v ~= math.floor(v) then
      fail("argument '%s': expected a positive integer, got %s", name, tostring(v))
    end
    return v
  end
  self.d_model = int_opt('d_model', 256)
  self.n_levels = int_opt('n_levels', 4)
  self.n_heads = int_opt('n_heads', 8)
  self.n_points = int_opt('n_points', 4)
  if self.d_model % self.n_heads ~= 0 then
    fail("argument 'd_model': expected a multiple of n_heads = %d, got %d", self.n_heads, self.d_model)
  end
  self.d_head = self.d_model / self.n_heads
  -- fa.msda options (padding 'zeros' and align_corners false are the reference's)
  self.msda_opts = { padding = opts.padding or 'zeros', align_corners = opts.align_corners or false,
                     deterministic = opts.deterministic or false }
  local d, M, L, P = self.d_model, self.n_heads, self.n_levels, self.n_points
  -- registration order = the reference's state_dict order
  self:registerModule('sampling_offsets', nn.Linear(d, M * L * P * 2))
  self:registerModule('attention_weights', nn.Linear(d, M * L * P))
  self:registerModule('value_proj', nn.Linear(d, d))
  self:registerModule('output_proj', nn.Linear(d, d))
  self:reset()
end

-- the reference's _reset_parameters
function MSDeformAttn:reset()
  local M, L, P = self.n_heads, self.n_levels, self.n_points
  self.sampling_offsets.weight:zero()
  -- thetas = arange(M) * (2 pi / M) in float32; grid = (cos, sin) / max(|cos|, |sin|); point i times i + 1
  local bias = {}
  local step = round32(2.0 * math.pi / M)
  for m = 0, M - 1 do
    local theta = round32(m * step)
    local c, s = round32(math.cos(theta)), round32(math.sin(theta))
    local mx = math.max(math.abs(c), math.abs(s))
    c, s = round32(c / mx), round32(s / mx)
    for _ = 1, L do
      for p = 1, P do
        bias[#bias + 1] = round32(c * p)
        bias[#bias + 1] = round32(s * p)
      end
    end
  end
  local b = self.sampling_offsets.bias
  b:copy(fa.tensor(bias, { dtype = 'float64' }):to(b:dtype(), b:device()))
  self.attention_weights.weight:zero()
  self.attention_weights.bias:zero()
  for _, name in ipairs({ 'value_proj', 'output_proj' }) do
    local lin = self[name]
    local bound = math.sqrt(6 / (lin.inputSize + lin.outputSize)) -- xavier_uniform_, gain 1
    lin.weight:uniform(-bound, bound)
    lin.bias:zero()
  end
  return self
end

function MSDeformAttn:__tostring__()
  return string.format('nn.MSDeformAttn(d_model %d, n_levels %d, n_heads %d, n_points %d)', self.d_model,
                       self.n_levels, self.n_heads, self.n_points)
end

---------------------------------------------------------------------------- helpers
local function buffer(self, key, shape, like)
  self[key] = nn._buffer(self[key], shape, like)
  return self[key]
end

local function dims_str(t) return table.concat(t, 'x') end

-- the levels as a Lua list {{H, W}, ...} read on the host, checked against the module and S; and
-- CPU int64 tensors of spatial_shapes and level_start_index for fa.msda
function MSDeformAttn:_levels(shapes, lsi, S)
  local L = self.n_levels
  local hw
  if fa.isTensor(shapes) then
    local dt = shapes:dtype()
    if dt ~= 'int64' and dt ~= 'int32' then
      fail("argument 'spatial_shapes': expected an int64 tensor (L, 2), got %s", dt)
    end
    if shapes:dim() ~= 2 or shapes:size(2) ~= 2 then
      fail("argument 'spatial_shapes': expected shape (L, 2) with L = n_levels = %d, got %s", L, shape_str(shapes))
    end
    hw = shapes:to('int64', 'cpu'):table()
  elseif type(shapes) == 'table' then
    hw = shapes
    for i, e in ipairs(hw) do
      if type(e) ~= 'table' or type(e[1]) ~= 'number' or type(e[2]) ~= 'number' then
        fail("argument 'spatial_shapes': expected {{H, W}, ...} or an (L, 2) int64 tensor, got a bad entry at level %d", i)
      end
    end
  else
    fail("argument 'spatial_shapes': expected an int64 tensor (L, 2), got %s", type(shapes))
  end
  if #hw ~= L then
    fail("argument 'spatial_shapes': expected %d levels (n_levels), got %d", L, #hw)
  end
  local starts, acc = {}, 0
  for l = 1, L do
    local h, w = tonumber(hw[l][1]), tonumber(hw[l][2])
    if h < 1 or w < 1 then
      fail("argument 'spatial_shapes': expected positive (H, W) at every level, got (%d, %d) at level %d", h, w, l)
    end
    starts[l] = acc
    acc = acc + h * w
  end
  if acc ~= S then
    fail("argument 'input_flatten': expected S = %d (the sum of H*W over spatial_shapes) in dimension 2, got %d", acc, S)
  end
  if lsi ~= nil then
    local got
    if fa.isTensor(lsi) then
      if lsi:dtype() ~= 'int64' and lsi:dtype() ~= 'int32' then
        fail("argument 'level_start_index': expected an int64 tensor (L), got %s", lsi:dtype())
      end
      if lsi:dim() ~= 1 or lsi:size(1) ~= L then
        fail("argument 'level_start_index': expected shape (%d), got %s", L, shape_str(lsi))
      end
      got = lsi:to('int64', 'cpu'):table()
    elseif type(lsi) == 'table' then
      got = lsi
    else
      fail("argument 'level_start_index': expected an int64 tensor (L), got %s", type(lsi))
    end
    for l = 1, L do
      if tonumber(got[l]) ~= starts[l] then
        fail("argument 'level_start_index': expected %d at level %d (the running sum of H*W), got %s", starts[l], l,
             tostring(got[l]))
      end
    end
  end
  -- CPU int64 copies for fa.msda, rebuilt only when the levels change
  local key = {}
  for l = 1, L do key[l] = hw[l][1] .. 'x' .. hw[l][2] end
  key = table.concat(key, ',')
  if self._levelKey ~= key or not fa.isTensor(self._shapesCPU) or self._shapesCPU:isCuda() then
    local t = {}
    for l = 1, L do t[l] = { tonumber(hw[l][1]), tonumber(hw[l][2]) } end
    self._shapesCPU = fa.tensor(t, 'int64')
    self._lsiCPU = fa.tensor(starts, 'int64')
    self._levelKey = key
  end
  return self._shapesCPU, self._lsiCPU
end

-- selection matrices (cached per reference-point kind, dtype and device) that broadcast reference points
-- (rows of L*nref values) to the sampling-location layout (M*L*P*2 columns) by a GEMM:
--   xy (L*nref, M*L*P*2): 1 where column (m, l, p, c) takes ref[l, c] (c = x, y)
--   wh (L*4, M*L*P*2): 0.5/P where column (m, l, p, c) takes ref[l, 2 + c] (boxes only)
function MSDeformAttn:_selection(nref, like)
  local key = nref .. like:dtype() .. like:device()
  self._sel = self._sel or {}
  local s = self._sel[key]
  if s and s.xy.desc.dtype == like.desc.dtype and s.xy.desc.device == like.desc.device then return s end
  local M, L, P = self.n_heads, self.n_levels, self.n_points
  local cols = M * L * P * 2
  local xy = fa.zeros(L * nref, cols, 'float64')
  local wh = nref == 4 and fa.zeros(L * nref, cols, 'float64') or nil
  local pxy = ffi.cast('double*', xy.desc.data)
  local pwh = wh and ffi.cast('double*', wh.desc.data)
  for m = 0, M - 1 do
    for l = 0, L - 1 do
      for p = 0, P - 1 do
        for c = 0, 1 do
          local col = ((m * L + l) * P + p) * 2 + c
          pxy[(l * nref + c) * cols + col] = 1
          if pwh then pwh[(l * nref + 2 + c) * cols + col] = 0.5 / P end
        end
      end
    end
  end
  s = { xy = xy:to(like:dtype(), like:device()), wh = wh and wh:to(like:dtype(), like:device()) }
  self._sel[key] = s
  return s
end

-- (rows, M*L*P*2): (1/W_l, 1/H_l) at every column (m, l, p, c) of every row (the 2-d offset normaliser),
-- cached for the current levels, row count, dtype and device
function MSDeformAttn:_invNormRows(rows, like)
  local z = self._invNorm
  if z == nil or z:size(1) ~= rows or self._invNormKey ~= self._levelKey or z.desc.dtype ~= like.desc.dtype
     or z.desc.device ~= like.desc.device then
    local M, L, P = self.n_heads, self.n_levels, self.n_points
    local hw = self._shapesCPU:table()
    local row = fa.empty(1, M * L * P * 2, 'float64')
    local pr = ffi.cast('double*', row.desc.data)
    for m = 0, M - 1 do
      for l = 0, L - 1 do
        for p = 0, P - 1 do
          local col = ((m * L + l) * P + p) * 2
          pr[col], pr[col + 1] = 1 / hw[l + 1][2], 1 / hw[l + 1][1]
        end
      end
    end
    row = row:to(like:dtype(), like:device())
    z = fa.empty(rows, M * L * P * 2, { dtype = like:dtype(), device = like:device() })
    -- ones (rows, 1) @ row (1, cols): the broadcast, written contiguous
    local ones = fa.ones(rows, 1, { dtype = like:dtype(), device = like:device() })
    fa.check(C.fa_matmul_forward(z.desc, ones.desc, row.desc, 0, 0, 1, 0))
    self._invNorm, self._invNormKey = z, self._levelKey
  end
  return z
end

local function get(input, i, name)
  local v = input[i]
  if v == nil then v = input[name] end
  return v
end

-- checks the input table; returns query, ref, x, shapes, lsi, mask, and the sizes
function MSDeformAttn:_unpack(input)
  if type(input) ~= 'table' then
    fail('expected a table {query, reference_points, input_flatten, spatial_shapes, level_start_index, input_padding_mask}, got %s',
         type(input))
  end
  local q = get(input, 1, 'query')
  local ref = get(input, 2, 'reference_points')
  local x = get(input, 3, 'input_flatten')
  local shapes = get(input, 4, 'spatial_shapes')
  local lsi = get(input, 5, 'level_start_index')
  local mask = get(input, 6, 'input_padding_mask')
  local C_, L = self.d_model, self.n_levels
  for _, a in ipairs({ { 'query', q }, { 'reference_points', ref }, { 'input_flatten', x } }) do
    if not fa.isTensor(a[2]) then fail("argument '%s': expected a tensor, got %s", a[1], type(a[2])) end
    if a[2].desc.dtype > 3 then fail("argument '%s': expected a floating-point tensor, got %s", a[1], a[2]:dtype()) end
  end
  if q:dim() ~= 3 or q:size(3) ~= C_ then
    fail("argument 'query': expected a 3-D tensor (N, Lq, %d), got %s", C_, shape_str(q))
  end
  local N, Lq = q:size(1), q:size(2)
  if x:dim() ~= 3 or x:size(3) ~= C_ then
    fail("argument 'input_flatten': expected a 3-D tensor (N, S, %d), got %s", C_, shape_str(x))
  end
  if x:size(1) ~= N then
    fail("argument 'input_flatten': expected batch size N = %d (as 'query'), got %d", N, x:size(1))
  end
  local S = x:size(2)
  if ref:dim() ~= 4 then
    fail("argument 'reference_points': expected a 4-D tensor (N, Lq, L, 2) or (N, Lq, L, 4), got %s", shape_str(ref))
  end
  local nref = ref:size(4)
  if nref ~= 2 and nref ~= 4 then
    fail("argument 'reference_points': expected the last dimension 2 (points) or 4 (boxes), got %d", nref)
  end
  if ref:size(1) ~= N or ref:size(2) ~= Lq or ref:size(3) ~= L then
    fail("argument 'reference_points': expected size %s (N, Lq, n_levels, %d), got %s", dims_str({ N, Lq, L, nref }),
         nref, shape_str(ref))
  end
  for _, a in ipairs({ { 'reference_points', ref }, { 'input_flatten', x } }) do
    if a[2].desc.device ~= q.desc.device then
      fail("argument '%s': expected a tensor on %s (as 'query'), got %s", a[1], q:device(), a[2]:device())
    end
    if a[2].desc.dtype ~= q.desc.dtype then
      fail("argument '%s': expected dtype %s (as 'query'), got %s", a[1], q:dtype(), a[2]:dtype())
    end
  end
  local w = self.value_proj.weight
  if w.desc.device ~= q.desc.device or w.desc.dtype ~= q.desc.dtype then
    fail("argument 'query': expected %s on %s (the module's parameters; convert with :type()/:cuda()), got %s on %s",
         w:dtype(), w:device(), q:dtype(), q:device())
  end
  if mask ~= nil then
    if not fa.isTensor(mask) then fail("argument 'input_padding_mask': expected a bool tensor (N, S) or nil, got %s", type(mask)) end
    if mask:dtype() ~= 'bool' then fail("argument 'input_padding_mask': expected a bool tensor (N, S), got %s", mask:dtype()) end
    if mask:dim() ~= 2 or mask:size(1) ~= N or mask:size(2) ~= S then
      fail("argument 'input_padding_mask': expected size %s (N, S), got %s", dims_str({ N, S }), shape_str(mask))
    end
  end
  local sc, lc = self:_levels(shapes, lsi, S)
  return q, ref, x, sc, lc, mask, N, Lq, S, nref
end

---------------------------------------------------------------------------- forward
function MSDeformAttn:updateOutput(input)
  local q, ref, x, shapes, lsi, mask, N, Lq, S, nref = self:_unpack(input)
  local M, L, P, D = self.n_heads, self.n_levels, self.n_points, self.d_head

  -- value = value_proj(x), zeroed at padding (masked_fill(mask, 0)): multiplied in place by keep = 1 - mask,
  -- broadcast over the channels by a GEMM with a row of ones (so that the product is a contiguous op)
  local value = self.value_proj:forward(x)
  if mask ~= nil then
    if mask.desc.device ~= q.desc.device then mask = mask:to(nil, q.desc.device) end
    local keep1 = buffer(self, '_keep1', { N * S, 1 }, q)
    keep1:view(N, S):copy(mask)
    fa.check(C.fa_scale_forward(keep1.desc, keep1.desc, -1, 1))
    local ones = self._onesRow
    if ones == nil or ones.desc.dtype ~= q.desc.dtype or ones.desc.device ~= q.desc.device then
      ones = fa.ones(1, self.d_model, { dtype = q:dtype(), device = q:device() })
      self._onesRow = ones
    end
    local keep = buffer(self, '_keep', { N, S, self.d_model }, q)
    local keep2 = keep:view(N * S, self.d_model) -- a local: a `.desc` of a temporary would not keep it alive
    fa.check(C.fa_matmul_forward(keep2.desc, keep1.desc, ones.desc, 0, 0, 1, 0))
    fa.check(C.fa_binary_forward(MUL, value.desc, value.desc, keep.desc, 1))
  end
  self._masked = mask ~= nil
  self._nref = nref
  self._value = value:view(N, S, M, D)

  -- offsets (N, Lq, M, L, P, 2) and A = softmax over L*P (N, Lq, M, L, P)
  local off = self.sampling_offsets:forward(q):view(N, Lq, M, L, P, 2)
  local logits = self.attention_weights:forward(q):view(N, Lq, M, L * P)
  local A = buffer(self, '_attn', { N, Lq, M, L, P }, q)
  F.softmax_forward(A:view(N, Lq, M, L * P), logits, 3, false)

  -- sampling locations, as (N*Lq, M*L*P*2) rows: loc = ref_xy + off * scale, where ref_xy and scale are
  -- ref broadcast over heads and points (a GEMM with a 0/1 selection matrix does the broadcast, so every
  -- elementwise op below runs on contiguous tensors of one shape)
  local rows, cols = N * Lq, M * L * P * 2
  local refC = nn._contiguous(self, '_refC', ref):view(rows, L * nref)
  local sel = self:_selection(nref, q)
  local rxy = buffer(self, '_refXY', { rows, cols }, q)
  fa.check(C.fa_matmul_forward(rxy.desc, refC.desc, sel.xy.desc, 0, 0, 1, 0))
  local scale
  if nref == 2 then
    scale = self:_invNormRows(rows, q) -- (1/W_l, 1/H_l) on every row
  else
    scale = buffer(self, '_whScale', { rows, cols }, q) -- ref_wh * 0.5 / P
    fa.check(C.fa_matmul_forward(scale.desc, refC.desc, sel.wh.desc, 0, 0, 1, 0))
  end
  self._scale = scale
  local loc = buffer(self, '_loc', { N, Lq, M, L, P, 2 }, q)
  local loc2, off2 = loc:view(rows, cols), off:view(rows, cols)
  fa.check(C.fa_addcmul_forward(loc2.desc, rxy.desc, off2.desc, scale.desc, 1))

  -- core, then output_proj
  local core = buffer(self, '_core', { N, Lq, M * D }, q)
  msda.msda(self._value, shapes, lsi, loc, A, { out = core, padding = self.msda_opts.padding,
            align_corners = self.msda_opts.align_corners, deterministic = self.msda_opts.deterministic })
  self.output = self.output_proj:forward(core)
  return self.output
end

---------------------------------------------------------------------------- backward
-- the input gradients; with acc, the children's fused backward also adds their parameter gradients
function MSDeformAttn:_backward(input, gradOutput, scale, acc)
  local q, ref, x, shapes, lsi, _, N, Lq, S, nref = self:_unpack(input)
  local M, L, P = self.n_heads, self.n_levels, self.n_points
  if not fa.isTensor(gradOutput) then fail("argument 'gradOutput': expected a tensor, got %s", type(gradOutput)) end
  if gradOutput:dim() ~= 3 or gradOutput:size(1) ~= N or gradOutput:size(2) ~= Lq or gradOutput:size(3) ~= self.d_model then
    fail("argument 'gradOutput': expected size %s (N, Lq, d_model), got %s", dims_str({ N, Lq, self.d_model }),
         shape_str(gradOutput))
  end
  local loc = self._loc
  if loc == nil or loc:size(1) ~= N or loc:size(2) ~= Lq or self._value:size(2) ~= S or self._nref ~= nref then
    fail('backward: expected the input of the last forward (call forward first)')
  end
  local function child(m, inp, g)
    if acc then return m:backward(inp, g, scale) end
    return m:updateGradInput(inp, g)
  end

  local gCore = child(self.output_proj, self._core, gradOutput)
  local gV = buffer(self, '_gValue', { N, S, M, self.d_head }, q)
  local gLoc = buffer(self, '_gLoc', { N, Lq, M, L, P, 2 }, q)
  local gA = buffer(self, '_gAttn', { N, Lq, M, L, P }, q)
  msda.msda_backward(gCore, self._value, shapes, lsi, self._loc, self._attn, { grad_value = gV,
                     grad_sampling_locations = gLoc, grad_attention_weights = gA, padding = self.msda_opts.padding,
                     align_corners = self.msda_opts.align_corners, deterministic = self.msda_opts.deterministic })

  -- softmax backward -> logits gradient
  local gLogits = buffer(self, '_gLogits', { N, Lq, M * L * P }, q)
  F.softmax_backward(gLogits:view(N, Lq, M, L * P), gA:view(N, Lq, M, L * P), self._attn:view(N, Lq, M, L * P), 3, false)

  -- offsets: d loc / d off = scale; reference points: the sums over heads and points (GEMMs with the
  -- transposed selection matrices), plus, for boxes, d loc / d ref_wh = off * 0.5 / P
  local rows, cols = N * Lq, M * L * P * 2
  local sel = self:_selection(nref, q)
  local gLoc2 = gLoc:view(rows, cols)
  local gOff = buffer(self, '_gOff', { rows, cols }, q)
  fa.check(C.fa_binary_forward(MUL, gOff.desc, gLoc2.desc, self._scale.desc, 1))
  local gRef = buffer(self, '_gRef', { N, Lq, L, nref }, q)
  local gRef2 = gRef:view(rows, L * nref)
  fa.check(C.fa_matmul_forward(gRef2.desc, gLoc2.desc, sel.xy.desc, 0, 1, 1, 0))
  if nref == 4 then
    local t = buffer(self, '_gTmp', { rows, cols }, q)
    local off2 = self.sampling_offsets.output:view(rows, cols)
    fa.check(C.fa_binary_forward(MUL, t.desc, gLoc2.desc, off2.desc, 1))
    fa.check(C.fa_matmul_forward(gRef2.desc, t.desc, sel.wh.desc, 0, 1, 1, 1))
  end

  -- query: through both projections of the query
  local gq1 = child(self.sampling_offsets, q, gOff:view(N, Lq, cols))
  local gq2 = child(self.attention_weights, q, gLogits)
  local gQuery = buffer(self, '_gQuery', { N, Lq, self.d_model }, q)
  fa.check(C.fa_binary_forward(ADD, gQuery.desc, gq1.desc, gq2.desc, 1))

  -- input_flatten: through the mask and value_proj
  local gVal = gV:view(N, S, self.d_model)
  if self._masked then
    gVal = buffer(self, '_gValMasked', { N, S, self.d_model }, q)
    local gV3 = gV:view(N, S, self.d_model)
    fa.check(C.fa_binary_forward(MUL, gVal.desc, gV3.desc, self._keep.desc, 1))
  end
  self._gValProj = gVal
  local gX = child(self.value_proj, x, gVal)

  self.gradInput = { gQuery, gRef, gX }
  return self.gradInput
end

function MSDeformAttn:updateGradInput(input, gradOutput)
  return self:_backward(input, gradOutput, 1, false)
end

-- uses the gradients that updateGradInput left (the Torch7 order: updateGradInput, then accGradParameters)
function MSDeformAttn:accGradParameters(input, gradOutput, scale)
  local q, _, x = self:_unpack(input)
  if self._gValProj == nil then fail('accGradParameters: call updateGradInput first') end
  local N, Lq = q:size(1), q:size(2)
  self.output_proj:accGradParameters(self._core, gradOutput, scale)
  self.sampling_offsets:accGradParameters(q, self._gOff:view(N, Lq, -1), scale)
  self.attention_weights:accGradParameters(q, self._gLogits, scale)
  self.value_proj:accGradParameters(x, self._gValProj, scale)
end

-- both in one pass (the children's fused backward calls)
function MSDeformAttn:backward(input, gradOutput, scale)
  return self:_backward(input, gradOutput, scale or 1, true)
end

return MSDeformAttn

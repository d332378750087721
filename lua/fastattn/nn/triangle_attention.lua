-- triangle_attention.lua: nn.TriangleAttention, OpenFold's triangle self-attention layer around the starting
-- or the ending node (openfold/model/triangular_attention.py with primitives.py's Attention; AF2 Alg. 13/14),
-- on fa.triangle_attention.
--
--   m = nn.TriangleAttention{c_in = 128, c_hidden = 32, no_heads = 4, starting = true, inf = 1e9,
--                            exact_mask = false}
--   out = m:forward{z, mask}              z (B, N, N, c_in), mask (B, N, N) with 1 = valid (float, int or bool) or nil
--   gradZ = m:backward({z, mask}, gradOutput)[1]
--
-- The output is the layer's update (B, N, N, c_in) without the residual, as OpenFold's module returns it:
--   x = LayerNorm(z)                       (ending node: the same on z transposed, (i, j) -> (j, i))
--   q, k, v = x W_q, x W_k, x W_v          (..., H, c_hidden), no bias; scores scaled by c_hidden^-1/2
--   bias[b, h, j, k] = (x W_b)[b, j, k, h] the pair bias, no bias term
--   o = softmax_k(q_ij . k_ik / sqrt(c_hidden) + bias_jk, keys k with mask[b, i, k] = 1) v_ik
--   out = (sigmoid(x W_g + b_g) * o) W_o + b_o
-- Parameters, named and initialised as OpenFold's: layer_norm.{weight,bias} (ones, zeros), linear.weight
-- (H, c_in; "normal": N(0, 1/c_in), kaiming_normal_ with the linear gain, not truncated),
-- mha.linear_{q,k,v}.weight (H*c_hidden, c_in; "glorot": xavier uniform), mha.linear_o.{weight,bias}
-- ("final": zeros), mha.linear_g.{weight,bias} ("gating": zeros, ones). So an OpenFold state_dict saved as
-- safetensors loads with m:loadStateDict(fa.load(path)).
--
-- The mask. By default it is a select: masked keys get weight 0 exactly. OpenFold adds inf * (mask - 1) to the
-- scores instead; the two agree on every row that has a valid key. They differ on a fully masked row (every
-- key k of row i masked): the select gives uniform weights (the mean of V) and no gradient to the scores;
-- OpenFold's sum gives softmax(scores - inf), which in float32 rounds to uniform too, but in float64 keeps
-- the scores (the ulp of 1e9 is 1.2e-7) and passes their gradient. exact_mask = true reproduces OpenFold's
-- sum (fa.triangle_attention's mask_scale = inf), for float64 parity with it.
--
-- The ending node runs on the same buffers as the starting node: LayerNorm and the projections act per pair
-- (i, j), so they run in z's own layout, and the transposition is only in the strides of the views handed to
-- fa.triangle_attention (q, k, v, its output, the mask); z and the mask are never copied. q, k and v come from
-- one GEMM (the three weights side by side) as the natural (B, N, N, 3, H, c_hidden) layout, passed as strided
-- (B, H, N, N, c_hidden) views. The pair bias is the one small copy, to (B, H, N, N).
-- Every intermediate lives in a buffer kept by the module and reused by the next call of the same size.
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local U = require 'fastattn.nn.layer_util'
local F = require 'fastattn.functional'
local E = require 'fastattn.errors'
local op = F._impl

local TriangleAttention = nn.class('TriangleAttention', nn.Module)

local NEW = 'fa.nn.TriangleAttention'
local OPTS = { c_in = true, c_hidden = true, no_heads = true, starting = true, inf = true, exact_mask = true }
local SIGMOID = F._unary_op.sigmoid

function TriangleAttention:__init(opts)
  nn.Module.__init(self)
  opts = E.opts(NEW, 'opts', opts, OPTS)
  self.c_in = E.integer(NEW, 'c_in', opts.c_in, 1, nil, true) or 128
  self.c_hidden = E.integer(NEW, 'c_hidden', opts.c_hidden, 1, nil, true) or 32
  self.no_heads = E.integer(NEW, 'no_heads', opts.no_heads, 1, nil, true) or 4
  self.starting = E.boolean(NEW, 'starting', opts.starting, true) ~= false
  self.inf = E.number(NEW, 'inf', opts.inf, true) or 1e9
  if not (self.inf > 0 and self.inf < math.huge) then E.argv(NEW, 'inf', 'a finite positive number', self.inf) end
  self.exact_mask = E.boolean(NEW, 'exact_mask', opts.exact_mask, true) or false
  local c, hd = self.c_in, self.c_hidden * self.no_heads
  local n = (c + 1) * (3 * hd + 2 * hd + self.no_heads + 2) + hd * c
  if n >= 2 ^ 53 or fa._beyond_host(n * fa.C.fa_dtype_size(fa.dtype_id(fa.getDefaultDtype()))) then
    E.fail(NEW, "arguments 'c_in', 'c_hidden', 'no_heads': parameters of %s elements are too large to allocate",
           n < 2 ^ 53 and string.format('%d', n) or string.format('%.4g', n))
  end
  -- registration order = OpenFold's state_dict order
  self:registerModule('layer_norm', nn.LayerNorm(c))
  self:registerModule('linear', nn.Linear(c, self.no_heads, false))
  local mha = nn.Module()
  mha:registerModule('linear_q', nn.Linear(c, hd, false))
  mha:registerModule('linear_k', nn.Linear(c, hd, false))
  mha:registerModule('linear_v', nn.Linear(c, hd, false))
  mha:registerModule('linear_o', nn.Linear(hd, c))
  mha:registerModule('linear_g', nn.Linear(c, hd))
  self:registerModule('mha', mha)
  self:reset()
end

-- OpenFold's initialisation (primitives.py's Linear inits and LayerNorm)
function TriangleAttention:reset()
  local c, hd = self.c_in, self.c_hidden * self.no_heads
  self.layer_norm:reset()
  self.linear.weight:normal(0, 1 / math.sqrt(c)) -- kaiming_normal_(nonlinearity = 'linear'): std 1/sqrt(fan_in)
  local bound = math.sqrt(6 / (c + hd))         -- xavier_uniform_, gain 1
  for _, name in ipairs({ 'linear_q', 'linear_k', 'linear_v' }) do self.mha[name].weight:uniform(-bound, bound) end
  self.mha.linear_o.weight:zero()
  self.mha.linear_o.bias:zero()
  self.mha.linear_g.weight:zero()
  self.mha.linear_g.bias:fill(1)
  return self
end

function TriangleAttention:__tostring__()
  return string.format('nn.TriangleAttention(c_in %d, c_hidden %d, no_heads %d, %s node%s)', self.c_in, self.c_hidden,
                       self.no_heads, self.starting and 'starting' or 'ending',
                       self.exact_mask and ', exact additive mask' or '')
end

---------------------------------------------------------------------------- helpers
local function buffer(self, key, shape, like)
  self[key] = nn._buffer(self[key], shape, like)
  return self[key]
end

-- checks the input table; returns z, mask, B, N
function TriangleAttention:_unpack(fn, input)
  if type(input) ~= 'table' or fa.isTensor(input) then
    E.argv(fn, 'input', 'a table {z, mask} (mask may be nil)', input)
  end
  local z, mask = input[1], input[2]
  local w = self.linear.weight
  E.tensor(fn, 'input[1]', z)
  local c = self.c_in
  if z.desc.dtype ~= w.desc.dtype or z.desc.device ~= w.desc.device then
    E.argv(fn, 'input[1]', string.format("a %s tensor on %s (the module's parameters; convert with :type()/:cuda())",
           w:dtype(), w:device()), z)
  end
  if z:dim() ~= 4 or z:size(2) ~= z:size(3) or z:size(4) ~= c then
    E.argv(fn, 'input[1]', string.format('a tensor of size (B, N, N, %d) (c_in = %d)', c, c), z)
  end
  local B, N = z:size(1), z:size(2)
  if mask ~= nil then
    E.tensor(fn, 'input[2]', mask, true)
    if mask:dim() ~= 3 or mask:size(1) ~= B or mask:size(2) ~= N or mask:size(3) ~= N then
      E.argv(fn, 'input[2]', string.format("a mask of size %dx%dx%d (B, N, N, as 'input[1]') or nil", B, N, N), mask)
    end
    if mask.desc.device ~= z.desc.device then
      E.argv(fn, 'input[2]', string.format("a mask on %s (as 'input[1]')", z:device()), mask)
    end
  end
  return z, mask, B, N
end

-- the dims of the attention views: (B, H, i, j, D) from the natural (B, N1, N2, H, D) layout
function TriangleAttention:_perm()
  if self.starting then return 1, 4, 2, 3, 5 end
  return 1, 4, 3, 2, 5
end

-- the op's options (kept tables: no allocation per call)
function TriangleAttention:_opts(o)
  o.scale = 1 / math.sqrt(self.c_hidden)
  o.mask_scale = self.exact_mask and self.inf or nil
  return o
end

---------------------------------------------------------------------------- forward
function TriangleAttention:updateOutput(input)
  local fn = self.__fnForward
  local z, mask, B, N = self:_unpack(fn, input)
  local H, D, c = self.no_heads, self.c_hidden, self.c_in
  local hd = H * D

  local x = self.layer_norm:forward(z)
  -- q, k, v from one GEMM: the three weights side by side (copied: the parameters stay separate tensors)
  local W = buffer(self, '_W', { 3 * hd, c }, z)
  W:narrow(1, 1, hd):copy(self.mha.linear_q.weight)
  W:narrow(1, hd + 1, hd):copy(self.mha.linear_k.weight)
  W:narrow(1, 2 * hd + 1, hd):copy(self.mha.linear_v.weight)
  local qkv = buffer(self, '_qkv', { B, N, N, 3 * hd }, z)
  op.linear(fn, x, W, nil, { out = qkv })
  local P = qkv:view(B, N, N, 3, H, D)
  local p1, p2, p3, p4, p5 = self:_perm()
  local q = P:select(4, 1):permute(p1, p2, p3, p4, p5)
  local k = P:select(4, 2):permute(p1, p2, p3, p4, p5)
  local v = P:select(4, 3):permute(p1, p2, p3, p4, p5)

  -- pair bias (B, H, j, k) = linear(x)[b, j, k, h] (ending: [b, k, j, h])
  local tb = self.linear:forward(x)
  local bias = buffer(self, '_bias', { B, H, N, N }, z):copy(tb:permute(p1, p2, p3, p4))
  local m = mask
  if m ~= nil and not self.starting then m = m:transpose(2, 3) end

  local o = buffer(self, '_o', { B, N, N, H, D }, z)
  local ov = o:permute(p1, p2, p3, p4, p5)
  self._fwdOpts = self._fwdOpts or {}
  local fo = self:_opts(self._fwdOpts)
  -- the log-sum-exp kept for the backward: float64 for float64, else float32
  local DT = fa.dtypes
  local lse = nn._buffer(self._lse, { B, H, N, N }, z.desc.dtype == DT.float64 and DT.float64 or DT.float32, z.desc.device)
  fo.out, fo.lse = ov, lse
  fa.triangle_attention(q, k, v, bias, m, fo)
  fo.out, fo.lse = nil, nil
  self._q, self._k, self._v, self._mask, self._ov, self._lse = q, k, v, m, ov, lse

  -- gate and output projection
  local gpre = self.mha.linear_g:forward(x)
  local gate = op.unary(fn, SIGMOID, gpre, { out = buffer(self, '_gate', { B, N, N, hd }, z) })
  local go = buffer(self, '_go', { B, N, N, hd }, z):copy(gate):mul_(o:view(B, N, N, hd))
  self.output = self.mha.linear_o:forward(go)
  return self.output
end

---------------------------------------------------------------------------- backward
-- the gradient of z; with acc, the children's fused backward calls also add their parameter gradients
function TriangleAttention:_backward(fn, input, gradOutput, scale, acc)
  local z, _, B, N = self:_unpack(fn, input)
  local H, D, c = self.no_heads, self.c_hidden, self.c_in
  local hd = H * D
  nn._checkGradOutput(fn, gradOutput, z, { B, N, N, c })
  local o = self._o
  if self._lse == nil or o:size(1) ~= B or o:size(2) ~= N or self.layer_norm.output == nil
     or not self.layer_norm.output:isSameSizeAs(z) then
    E.fail(fn, 'expected the input of the last forward (call forward first)')
  end
  local child = U.childBackward(acc, scale)
  local x = self.layer_norm.output
  local p1, p2, p3, p4, p5 = self:_perm()

  -- output projection and gate
  local gGO = child(self.mha.linear_o, self._go, gradOutput)
  local gate = self._gate
  local gO = buffer(self, '_gO', { B, N, N, H, D }, z)
  gO:view(B, N, N, hd):copy(gGO):mul_(gate)
  local gGate = buffer(self, '_gGate', { B, N, N, hd }, z):copy(gGO):mul_(o:view(B, N, N, hd))
  local gGpre = op.unary_backward(fn, SIGMOID, gGate, nil, { output = gate,
                                  grad_input = buffer(self, '_gGpre', { B, N, N, hd }, z) })

  -- the attention core. q, k, v gradients in their natural (B, N, N, H, D) layout, then side by side for the
  -- GEMM's backward (the op refuses output buffers whose memory ranges interleave, so not straight into it)
  local gbias = buffer(self, '_gBias', { B, H, N, N }, z)
  self._bwdOpts = self._bwdOpts or {}
  local bo = self:_opts(self._bwdOpts)
  local g3 = {}
  for i, key in ipairs({ '_gq', '_gk', '_gv' }) do g3[i] = buffer(self, key, { B, N, N, H, D }, z) end
  bo.grad_q = g3[1]:permute(p1, p2, p3, p4, p5)
  bo.grad_k = g3[2]:permute(p1, p2, p3, p4, p5)
  bo.grad_v = g3[3]:permute(p1, p2, p3, p4, p5)
  bo.grad_bias = gbias
  fa.triangle_attention_backward(gO:permute(p1, p2, p3, p4, p5), self._q, self._k, self._v, self._bias, self._mask,
                                 self._ov, self._lse, bo)
  bo.grad_q, bo.grad_k, bo.grad_v, bo.grad_bias = nil, nil, nil, nil
  local gqkv = buffer(self, '_gqkv', { B, N, N, 3 * hd }, z)
  local gP = gqkv:view(B, N, N, 3, H, D)
  for i = 1, 3 do gP:select(4, i):copy(g3[i]) end
  local gTB = buffer(self, '_gTB', { B, N, N, H }, z)
  gTB:permute(p1, p2, p3, p4):copy(gbias)

  -- x gets the gradients of the q/k/v GEMM, the pair bias and the gate
  local gx = buffer(self, '_gx', { B, N, N, c }, z)
  op.linear_backward(fn, gqkv, x, self._W, { grad_input = gx, grad_weight = false, grad_bias = false })
  if acc then self:_accQKV(fn, x, scale) end
  gx:add_(child(self.linear, x, gTB)):add_(child(self.mha.linear_g, x, gGpre))
  self.gradInput = { child(self.layer_norm, z, gx) }
  return self.gradInput
end

-- adds scale * the gradients of W_q, W_k, W_v (from the q/k/v GEMM's gradient left by the backward)
function TriangleAttention:_accQKV(fn, x, scale)
  local hd = self.no_heads * self.c_hidden
  local gW = buffer(self, '_gW', { 3 * hd, self.c_in }, x):zero()
  op.linear_backward(fn, self._gqkv, x, self._W, { grad_input = false, grad_weight = gW, grad_bias = false })
  if scale ~= 1 then gW:scale_(scale) end
  self.mha.linear_q.gradWeight:add_(gW:narrow(1, 1, hd))
  self.mha.linear_k.gradWeight:add_(gW:narrow(1, hd + 1, hd))
  self.mha.linear_v.gradWeight:add_(gW:narrow(1, 2 * hd + 1, hd))
end

function TriangleAttention:updateGradInput(input, gradOutput)
  return self:_backward(self.__fnUpdateGradInput, input, gradOutput, 1, false)
end

-- uses what updateGradInput left (the Torch7 order: updateGradInput, then accGradParameters)
function TriangleAttention:accGradParameters(input, gradOutput, scale)
  local fn = self.__fnAccGradParameters
  local z = self:_unpack(fn, input)
  scale = E.number(fn, 'scale', scale, true) or 1
  if self._gx == nil or self._gx:size(1) ~= z:size(1) or self._gx:size(2) ~= z:size(2) then
    E.fail(fn, 'call updateGradInput before accGradParameters')
  end
  local x = self.layer_norm.output
  self.mha.linear_o:accGradParameters(self._go, gradOutput, scale)
  self.mha.linear_g:accGradParameters(x, self._gGpre, scale)
  self.linear:accGradParameters(x, self._gTB, scale)
  self:_accQKV(fn, x, scale)
  self.layer_norm:accGradParameters(z, self._gx, scale)
end

-- both in one pass (the children's fused backward calls)
function TriangleAttention:backward(input, gradOutput, scale)
  return self:_backward(self.__fnBackward, input, gradOutput, E.number(self.__fnBackward, 'scale', scale, true) or 1,
                        true)
end

return TriangleAttention

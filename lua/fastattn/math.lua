-- math.lua: elementwise arithmetic with broadcasting, unary functions, reductions, matmul and the
-- comparison helpers, as Tensor methods and fa.* functions. Each is one C call after shape checks.
local ffi = require 'ffi'
local lib = require 'fastattn.ffi'
local T = require 'fastattn.tensor'
local E = require 'fastattn.errors'
local Tensor, new, new_like, isTensor = T.Tensor, T._new, T._new_like, T.isTensor
local check = E.check

local M = {}

-- the broadcast shape of two shapes (PyTorch rules), or an error naming fn
local function broadcast_shape(fn, a, b)
  local sa, sb = a:size(), b:size()
  local n = math.max(#sa, #sb)
  local out = {}
  for i = 1, n do
    local x = sa[#sa - n + i] or 1
    local y = sb[#sb - n + i] or 1
    if x ~= y and x ~= 1 and y ~= 1 then
      E.raise(string.format('%s: sizes %s and %s cannot be broadcast (dimension %d: %d vs %d)', fn,
              T._shape_str(a, 'x'), T._shape_str(b, 'x'), i, x, y))
    end
    out[i] = x == 1 and y or x
  end
  return out
end
M._broadcast_shape = broadcast_shape

local function same_device(fn, a, b, aname, bname)
  if a.desc.device ~= b.desc.device then
    E.arg(fn, bname or 'other', string.format("a tensor on %s (as '%s')", a:device(), aname or 'self'), E.describe(b))
  end
end

local function scalar_like(x, v)
  return T.full({}, v, { dtype = x:dtype(), device = x:device() })
end

local OPS = { add = 0, sub = 1, mul = 2, div = 3 }
local FN = {}
for name in pairs(OPS) do FN[name] = 'Tensor:' .. name end

-- do two descriptors have the same sizes? (no Lua tables: the hot path)
local function same_shape(a, b)
  local n = a.ndim
  if n ~= b.ndim then return false end
  for i = 0, n - 1 do if a.shape[i] ~= b.shape[i] then return false end end
  return true
end

-- do a descriptor's sizes equal a Lua array of sizes?
local function same_sizes(d, shape)
  if d.ndim ~= #shape then return false end
  for i = 1, #shape do if d.shape[i - 1] ~= shape[i] then return false end end
  return true
end

-- an integer tensor takes integer numbers only: 1 + 0.5 would truncate silently (PyTorch promotes to float instead)
local function int_operand(fn, name, v, x)
  local dt = x.desc.dtype
  if (dt == T.dtypes.int32 or dt == T.dtypes.int64) and not (v == math.floor(v) and v > -2 ^ 63 and v < 2 ^ 63) then
    E.arg(fn, name, string.format('an integer for an %s tensor (convert it with :double() first)', x:dtype()), E.describe(v))
  end
  return v
end

-- C argument names as the Lua caller knows them
local RENAME = { a = 'self', b = 'other' }

-- out = a <op> alpha*b with broadcasting; b may be a number; `out` optional (may alias a)
local function binary(name, a, b, alpha, out, fn)
  fn = fn or FN[name]
  -- fast path: two tensors of one shape on one device, `out` absent or of that shape (C checks the rest)
  if isTensor(a) and isTensor(b) and (alpha == nil or type(alpha) == 'number' and alpha == alpha) then
    local ad, bd = a.desc, b.desc
    if ad.device == bd.device and same_shape(ad, bd) and (out == nil or same_shape(out.desc, ad)) then
      out = out or new_like(a, nil, nil, fn)
      check(lib.fa_binary_forward(OPS[name], out.desc, ad, bd, alpha or 1), fn, RENAME)
      return out
    end
  end
  E.number(fn, 'alpha', alpha, true)
  if type(a) == 'number' and isTensor(b) then a = scalar_like(b, int_operand(fn, 'self', a, b)) end
  if not isTensor(a) then E.argv(fn, 'self', 'a tensor', a) end
  if alpha then int_operand(fn, 'alpha', alpha, a) end
  if type(b) == 'boolean' then b = b and 1 or 0 end
  if type(b) == 'number' then
    int_operand(fn, 'other', b, a)
    if name == 'add' or name == 'sub' then
      local shift = name == 'add' and b * (alpha or 1) or -b * (alpha or 1)
      out = out or new_like(a, nil, nil, fn)
      check(lib.fa_scale_forward(out.desc, a.desc, 1, shift), fn, RENAME)
      return out
    elseif name == 'mul' or (name == 'div' and a.desc.dtype ~= T.dtypes.int32 and a.desc.dtype ~= T.dtypes.int64) then
      local s = name == 'mul' and b * (alpha or 1) or 1 / (b * (alpha or 1))
      out = out or new_like(a, nil, nil, fn)
      check(lib.fa_scale_forward(out.desc, a.desc, s, 0), fn, RENAME)
      return out
    end
  end
  -- integer division by a number stays exact (truncating) through the tensor path, not a float reciprocal
  if type(b) == 'number' then b = scalar_like(a, b * (alpha or 1)); alpha = 1 end
  if not isTensor(b) then E.argv(fn, 'other', 'a tensor or a number', b) end
  same_device(fn, a, b)
  local shape = broadcast_shape(fn, a, b)
  if out ~= nil and not same_sizes(out.desc, shape) then
    E.raise(string.format('%s: the result of size %s does not fit in self of size %s (in-place ops do not broadcast self)',
                          fn, table.concat(shape, 'x'), T._shape_str(out, 'x')))
  end
  out = out or new(shape, a.desc.dtype, a.desc.device, fn)
  local ea = a:isSameSizeAs(out) and a or a:expand(shape)
  local eb = b:isSameSizeAs(out) and b or b:expand(shape)
  check(lib.fa_binary_forward(OPS[name], out.desc, ea.desc, eb.desc, alpha or 1), fn, RENAME)
  return out
end

-- x:add(y), x:add(y, alpha) (= x + alpha*y); x:add_(y) in place. Same for sub, mul, div.
for name in pairs(OPS) do
  Tensor[name] = function(self, b, alpha) return binary(name, self, b, alpha) end
  local fn_ = FN[name] .. '_'
  Tensor[name .. '_'] = function(self, b, alpha)
    E.tensor(fn_, 'self', self)
    T._check_writable(fn_, self)
    return binary(name, self, T._unaliased(self, b), alpha, self, fn_)
  end
  local mfn = 'fa.' .. name
  M[name] = function(a, b, alpha)
    if not isTensor(a) and not isTensor(b) then E.argv(mfn, 'a', 'a tensor (or a number beside a tensor)', a) end
    return binary(name, a, b, alpha, nil, mfn)
  end
end

-- x:addcmul(b, c, value) = x + value*b*c; addcmul_ in place
-- (b and c of self's shape, dtype and device: C checks them, no broadcasting)
local function addcmul(fn, self, b, c, value, out)
  E.tensor(fn, 'self', self)
  E.tensor(fn, 'tensor1', b)
  E.tensor(fn, 'tensor2', c)
  value = E.number(fn, 'value', value, true) or 1
  if out then
    T._check_writable(fn, out)
    b, c = T._unaliased(out, b), T._unaliased(out, c)
  end
  out = out or new_like(self, nil, nil, fn)
  check(lib.fa_addcmul_forward(out.desc, self.desc, b.desc, c.desc, value), fn,
        { a = 'self', b = 'tensor1', c = 'tensor2', out = 'self' })
  return out
end
-- x:addcmul(b, c, value, {out = t}) writes into t (the buffer convention of fa.F)
function Tensor:addcmul(b, c, value, opts)
  local o = E.opts('Tensor:addcmul', 'opts', opts, { out = true })
  if o.out ~= nil then E.tensor('Tensor:addcmul', 'opts.out', o.out) end
  return addcmul('Tensor:addcmul', self, b, c, value, o.out)
end
function Tensor:addcmul_(b, c, value) return addcmul('Tensor:addcmul_', self, b, c, value, self) end
function Tensor:scale(s, shift) -- s*x + shift
  local fn = 'Tensor:scale'
  int_operand(fn, 'scale', E.number(fn, 'scale', s), self)
  shift = int_operand(fn, 'shift', E.number(fn, 'shift', shift, true) or 0, self)
  local out = new_like(self, nil, nil, fn)
  check(lib.fa_scale_forward(out.desc, self.desc, s, shift), fn, { a = 'self' })
  return out
end
function Tensor:scale_(s, shift)
  local fn = 'Tensor:scale_'
  T._check_writable(fn, self)
  int_operand(fn, 'scale', E.number(fn, 'scale', s), self)
  shift = int_operand(fn, 'shift', E.number(fn, 'shift', shift, true) or 0, self)
  check(lib.fa_scale_forward(self.desc, self.desc, s, shift), fn, { a = 'self', out = 'self' })
  return self
end

local UNARY = { exp = 0, log = 1, sqrt = 2, abs = 3, sign = 4, neg = 5, relu = 6, tanh = 7, sigmoid = 8, gelu = 9 }
M.UNARY = UNARY
for name, op in pairs(UNARY) do
  local fn, fn_, mfn = 'Tensor:' .. name, 'Tensor:' .. name .. '_', 'fa.' .. name
  Tensor[name] = function(self)
    local out = new_like(self, nil, nil, fn)
    check(lib.fa_unary_forward(op, out.desc, self.desc), fn, { x = 'self' })
    return out
  end
  Tensor[name .. '_'] = function(self)
    T._check_writable(fn_, self)
    check(lib.fa_unary_forward(op, self.desc, self.desc), fn_, { x = 'self', out = 'self' })
    return self
  end
  M[name] = function(x)
    E.tensor(mfn, 'input', x)
    local out = new_like(x, nil, nil, mfn)
    check(lib.fa_unary_forward(op, out.desc, x.desc), mfn, { x = 'input' })
    return out
  end
end

-- operators: + - * / between tensors and numbers, unary minus
local mt = T._mt
mt.__add = function(a, b)
  if not isTensor(a) then a, b = b, a end
  return binary('add', a, b, nil, nil, 'Tensor:add')
end
mt.__sub = function(a, b)
  if not isTensor(a) then
    if type(a) ~= 'number' then E.argv('Tensor:sub', 'self', 'a tensor or a number', a) end
    return binary('add', b:neg(), a, nil, nil, 'Tensor:sub')
  end
  return binary('sub', a, b, nil, nil, 'Tensor:sub')
end
mt.__mul = function(a, b)
  if not isTensor(a) then a, b = b, a end
  return binary('mul', a, b, nil, nil, 'Tensor:mul')
end
mt.__div = function(a, b)
  if not isTensor(a) then
    if type(a) ~= 'number' then E.argv('Tensor:div', 'self', 'a tensor or a number', a) end
    return binary('div', scalar_like(b, a), b, nil, nil, 'Tensor:div')
  end
  return binary('div', a, b, nil, nil, 'Tensor:div')
end
mt.__unm = function(a) return a:neg() end

---------------------------------------------------------------------------- reductions
local RED = { sum = 0, mean = 1, max = 2, argmax = 3 }

local function reduce_out_shape(x, dim)
  local s = x:size()
  s[dim] = 1
  return s
end

-- sum()/mean()/max() without a dim return a number (Torch7); with a dim a tensor that keeps the dim
-- (size 1) unless keepdim is false (PyTorch's keepdim; the default true is Torch7's). max(dim) returns values and
-- 1-based int64 indices; argmax(dim) the indices alone.
local function reduce(name, x, dim, keepdim)
  local fn = 'Tensor:' .. name
  local op = RED[name]
  if dim == nil then
    if keepdim ~= nil then E.argv(fn, 'keepdim', 'nothing without a dim (a full reduction gives a number)', keepdim) end
    local out = new({}, (op == RED.argmax) and T.dtypes.int64 or x.desc.dtype, x.desc.device, fn)
    check(lib.fa_reduce_forward(op, out.desc, nil, x.desc, -1), fn, { x = 'self' })
    local v = out:item()
    if op == RED.argmax then return v + 1 end
    return v
  end
  dim = T._norm_dim(x, dim, fn)
  if E.boolean(fn, 'keepdim', keepdim, true) == false then
    local a, b = reduce(name, x, dim)
    if b then return a:squeeze(dim), b:squeeze(dim) end
    return a:squeeze(dim)
  end
  local shape = reduce_out_shape(x, dim)
  if op == RED.argmax then
    local idx = new(shape, T.dtypes.int64, x.desc.device, fn)
    check(lib.fa_reduce_forward(op, idx.desc, nil, x.desc, dim - 1), fn, { x = 'self' })
    return idx:add_(1)
  end
  local out = new(shape, x.desc.dtype, x.desc.device, fn)
  if op == RED.max then
    local idx = new(shape, T.dtypes.int64, x.desc.device, fn)
    check(lib.fa_reduce_forward(op, out.desc, idx.desc, x.desc, dim - 1), fn, { x = 'self' })
    return out, idx:add_(1)
  end
  check(lib.fa_reduce_forward(op, out.desc, nil, x.desc, dim - 1), fn, { x = 'self' })
  return out
end
for name in pairs(RED) do
  Tensor[name] = function(self, dim, keepdim) return reduce(name, self, dim, keepdim) end
end

---------------------------------------------------------------------------- matmul
-- 1-D·1-D, 2-D @ 2-D, batched (..., m, k) @ (..., k, n) with the batch dims broadcast
function Tensor:matmul(b)
  local fn = 'Tensor:matmul'
  local a = self
  E.tensor(fn, 'self', a)
  E.tensor(fn, 'other', b)
  same_device(fn, a, b)
  local na, nb = a:dim(), b:dim()
  if na == 0 then E.raise(fn .. ': expected self with at least 1 dimension, got ' .. E.describe(a)) end
  if nb == 0 then E.arg(fn, 'other', 'a tensor of at least 1 dimension', E.describe(b)) end
  local squeeze_a, squeeze_b = na == 1, nb == 1
  if squeeze_a then a = a:view(1, a:size(1)) end
  if squeeze_b then b = b:view(b:size(1), 1) end
  local m, k, k2, n = a:size(-2), a:size(-1), b:size(-2), b:size(-1)
  if k ~= k2 then
    E.raise(string.format('%s: inner sizes differ: %s @ %s', fn, T._shape_str(self, 'x'), T._shape_str(b, 'x')))
  end
  local out
  if a:dim() == 2 and b:dim() == 2 then
    out = new({ m, n }, a.desc.dtype, a.desc.device, fn)
    check(lib.fa_matmul_forward(out.desc, a.desc, b.desc, 0, 0, 1, 0), fn, { a = 'self', b = 'other' })
  else
    -- flatten broadcast batch dims into one
    local ba, bb = a:size(), b:size()
    table.remove(ba); table.remove(ba); table.remove(bb); table.remove(bb)
    local bshape = broadcast_shape(fn, T.empty(ba), T.empty(bb))
    local nbatch = 1
    for _, s in ipairs(bshape) do nbatch = nbatch * s end
    local function batched(x, bs, r, c)
      local full = { unpack(bshape) }
      full[#full + 1] = r; full[#full + 1] = c
      local e = x:expand(full)
      if #bs == 0 or (x:dim() == #full and e:isContiguous()) then
        return e:reshape(nbatch, r, c)
      end
      return e:contiguous():view(nbatch, r, c)
    end
    local a3 = #ba == 0 and a:view(1, m, k) or batched(a, ba, m, k)
    local b3 = #bb == 0 and b:view(1, k, n) or batched(b, bb, k, n)
    out = new({ nbatch, m, n }, a.desc.dtype, a.desc.device, fn)
    check(lib.fa_matmul_forward(out.desc, a3.desc, b3.desc, 0, 0, 1, 0), fn, { a = 'self', b = 'other' })
    local full = { unpack(bshape) }
    full[#full + 1] = m; full[#full + 1] = n
    out = out:view(full)
  end
  if squeeze_a then out = out:squeeze(out:dim() - 1) end
  if squeeze_b then out = out:squeeze(out:dim()) end
  return out
end
M.matmul = function(a, b)
  E.tensor('fa.matmul', 'a', a)
  return a:matmul(b)
end
Tensor.mm = Tensor.matmul

---------------------------------------------------------------------------- comparisons
-- fa.allclose(a, b, rtol, atol): |a - b| <= atol + rtol*|b| everywhere (computed in float64 on the CPU)
local function tolerance(fn, name, v, default)
  if v == nil then return default end
  if type(v) ~= 'number' or v ~= v or v < 0 then E.argv(fn, name, 'a number >= 0', v) end
  return v
end

local function allclose(fn, a, b, rtol, atol)
  E.tensor(fn, 'a', a)
  E.tensor(fn, 'b', b)
  rtol, atol = tolerance(fn, 'rtol', rtol, 1e-5), tolerance(fn, 'atol', atol, 1e-8)
  if not a:isSameSizeAs(b) then return false end
  local x, y = a:to('float64', 'cpu'):contiguous(), b:to('float64', 'cpu'):contiguous()
  local p, q = T._reader(x), T._reader(y)
  for i = 0, x:numel() - 1 do
    local u, v = p(i), q(i)
    if u ~= v then
      if u ~= u or v ~= v or math.abs(u - v) > atol + rtol * math.abs(v) then return false end
    end
  end
  return true
end
function M.allclose(a, b, rtol, atol) return allclose('fa.allclose', a, b, rtol, atol) end
function M.maxAbsDiff(a, b)
  local fn = 'fa.maxAbsDiff'
  E.tensor(fn, 'a', a)
  E.tensor(fn, 'b', b)
  if not a:isSameSizeAs(b) then E.arg(fn, 'b', "a tensor of size " .. T._shape_str(a, 'x') .. " (as 'a')", E.describe(b)) end
  local x, y = a:to('float64', 'cpu'):contiguous(), b:to('float64', 'cpu'):contiguous()
  local p, q = T._reader(x), T._reader(y)
  local m = 0
  for i = 0, x:numel() - 1 do
    local d = math.abs(p(i) - q(i))
    if d ~= d then return math.huge end
    if d > m then m = d end
  end
  return m
end
-- x:equal(y): same shape and exactly the same values
function Tensor:equal(b)
  E.tensor('Tensor:equal', 'other', b)
  return self:isSameSizeAs(b) and allclose('Tensor:equal', self, b, 0, 0)
end
function Tensor:allclose(b, rtol, atol) return allclose('Tensor:allclose', self, b, rtol, atol) end

return M

-- tensor.lua: fa.Tensor, an ffi.metatype object holding an fa_tensor descriptor and one reference to a
-- ref-counted fa_storage (DESIGN §3). Views share the storage. Dims and indices are 1-based, as in Torch7.
local ffi = require 'ffi'
local lib = require 'fastattn.ffi'

-- The metatype and the RNG state exist once per Lua state: when the module is loaded again (busted's
-- insulation, or a user clearing package.loaded) return the first instance instead of a second RNG.
local registry = debug.getregistry()
if registry.fastattn_tensor then return registry.fastattn_tensor end

local M = {}          -- module-level functions (merged into `fa` by init.lua)
local Tensor = {}     -- methods
M.Tensor = Tensor

---------------------------------------------------------------------------- dtypes and devices
local DT = { float32 = 0, float64 = 1, bfloat16 = 2, float16 = 3, int32 = 4, int64 = 5, bool = 6 }
local DT_ALIAS = { float = 'float32', double = 'float64', half = 'float16', bf16 = 'bfloat16', int = 'int32',
                   long = 'int64', byte = 'bool' }
local DT_NAME = { [0] = 'float32', 'float64', 'bfloat16', 'float16', 'int32', 'int64', 'bool' }
local DT_TYPE = { [0] = 'fa.FloatTensor', 'fa.DoubleTensor', 'fa.BFloat16Tensor', 'fa.HalfTensor', 'fa.IntTensor',
                  'fa.LongTensor', 'fa.BoolTensor' }
local TYPE_DT = {}
for k, v in pairs(DT_TYPE) do TYPE_DT[v] = k; TYPE_DT[v:gsub('^fa%.', 'torch.')] = k end
local DT_PTR = { [0] = 'float*', 'double*', 'uint16_t*', 'uint16_t*', 'int32_t*', 'int64_t*', 'uint8_t*' }
M.dtypes = DT

local default_dtype = 0

-- dtype id from a name ('float32', 'double', 'fa.FloatTensor', ...) or an id; errors name `fn`
local function dtype_id(d, fn)
  if d == nil then return default_dtype end
  if type(d) == 'number' and DT_NAME[d] then return d end
  if type(d) == 'string' then
    local id = DT[d] or DT[DT_ALIAS[d] or ''] or TYPE_DT[d]
    if id then return id end
  end
  error(string.format("%s: expected a dtype (float32, float64, bfloat16, float16, int32, int64, bool), got %s",
        fn or 'fastattn', tostring(d)), 3)
end
M.dtype_id = dtype_id

-- device index (-1 = CPU) from 'cpu', 'cuda', 'cuda:1', a number (0-based CUDA ordinal) or nil
local function device_id(d, fn)
  if d == nil or d == 'cpu' then return -1 end
  if type(d) == 'number' then return d end
  if d == 'cuda' then return tonumber(lib.fa_cuda_get_device()) >= 0 and tonumber(lib.fa_cuda_get_device()) or 0 end
  local i = type(d) == 'string' and d:match('^cuda:(%d+)$')
  if i then return tonumber(i) end
  error(string.format("%s: expected a device ('cpu', 'cuda', 'cuda:N'), got %s", fn or 'fastattn', tostring(d)), 3)
end
M.device_id = device_id

local function device_name(id) return id < 0 and 'cpu' or ('cuda:' .. id) end

function M.setDefaultDtype(d) default_dtype = dtype_id(d, 'fa.setDefaultDtype') end
function M.getDefaultDtype() return DT_NAME[default_dtype] end

---------------------------------------------------------------------------- errors
local function check(rc, level)
  if rc ~= 0 then error(ffi.string(lib.fa_last_error()), (level or 1) + 1) end
end
M.check = check

---------------------------------------------------------------------------- construction
local ctype -- set below by ffi.metatype

-- GC hook for GPU memory (DESIGN §3): the CUDA allocator counts bytes allocated since the last collection;
-- past a threshold a full collection frees the storages of unreachable tensors, so a training loop never
-- runs out of memory because the collector lagged. The threshold grows with the memory in use.
-- Asking the allocator costs a C call and a lock, so it is asked only every GC_CHECK_COUNT allocations or
-- every GC_CHECK_BYTES allocated from Lua, whichever comes first: the collection may come that much later
-- (a few MiB), which the threshold (256 MiB or half the memory in use) dwarfs.
local gc_stats = ffi.new('int64_t[4]')
M.gcThresholdBytes = 256 * 1024 * 1024
local GC_CHECK_COUNT, GC_CHECK_BYTES = 64, 4 * 1024 * 1024
local gc_count, gc_bytes = 0, 0
local function after_cuda_alloc(device, nbytes)
  gc_count, gc_bytes = gc_count + 1, gc_bytes + nbytes
  if gc_count < GC_CHECK_COUNT and gc_bytes < GC_CHECK_BYTES then return end
  gc_count, gc_bytes = 0, 0
  if lib.fa_cuda_memory_stats(device, gc_stats) ~= 0 then return end
  local since, inuse = tonumber(gc_stats[3]), tonumber(gc_stats[0])
  if since > math.max(M.gcThresholdBytes, inuse * 0.5) then
    lib.fa_cuda_gc_reset(device)
    collectgarbage('collect')
  end
end

local function contiguous_strides(x)
  local d, s = x.desc, 1
  for i = d.ndim - 1, 0, -1 do
    d.stride[i] = s
    s = s * d.shape[i]
  end
end

-- The same hook for CPU memory: the collector sees a tensor as a small cdata, not as its megabytes, so an
-- allocating loop would grow the heap by gigabytes before a collection. Collect after every
-- cpuGcThresholdBytes of tensor allocations (a full collection costs in proportion to the Lua heap, not to
-- the tensor bytes).
M.cpuGcThresholdBytes = 64 * 1024 * 1024
local cpu_since = 0
local function after_cpu_alloc(nbytes)
  cpu_since = cpu_since + nbytes
  if cpu_since > M.cpuGcThresholdBytes then
    cpu_since = 0
    collectgarbage('collect')
  end
end

-- storage of nbytes for the new tensor x (descriptor filled in), collecting once on a CUDA out-of-memory
local function alloc_storage(x, device, nbytes, fn)
  local st = lib.fa_storage_new(device, nbytes)
  if st == nil then
    if device >= 0 then collectgarbage('collect'); st = lib.fa_storage_new(device, nbytes) end
    if st == nil then error((fn or 'fa.empty') .. ': ' .. ffi.string(lib.fa_last_error()), 4) end
  end
  x.storage = st
  x.desc.data = st.data
  if device >= 0 then after_cuda_alloc(device, nbytes)
  else after_cpu_alloc(nbytes) end
  return x
end

-- a new, uninitialised, contiguous tensor of the given shape (a Lua array of sizes)
local function new(shape, dtype, device, fn)
  local n = #shape
  if n > 8 then error((fn or 'fa.empty') .. ': at most 8 dimensions, got ' .. n, 3) end
  local x = ctype()
  local d = x.desc
  d.dtype, d.device, d.ndim = dtype, device, n
  local numel = 1
  for i = 1, n do
    local s = shape[i]
    if type(s) ~= 'number' or s < 0 or s ~= math.floor(s) then
      error(string.format('%s: sizes must be non-negative integers, got %s in dimension %d', fn or 'fa.empty', tostring(s), i), 3)
    end
    d.shape[i - 1] = s
    numel = numel * s
  end
  contiguous_strides(x)
  return alloc_storage(x, device, numel * lib.fa_dtype_size(dtype), fn)
end
M._new = new

-- a new, uninitialised, contiguous tensor of src's shape (src a tensor), of the given dtype and device
-- (src's when nil): the hot path of elementwise ops, without the Lua tables of size() and new()
local function new_like(src, dtype, device, fn)
  local sd = src.desc
  dtype, device = dtype or sd.dtype, device or sd.device
  local x = ctype()
  local d = x.desc
  local n = sd.ndim
  d.dtype, d.device, d.ndim = dtype, device, n
  local numel = 1
  for i = n - 1, 0, -1 do
    local s = tonumber(sd.shape[i])
    d.shape[i] = s
    d.stride[i] = numel
    numel = numel * s
  end
  return alloc_storage(x, device, numel * lib.fa_dtype_size(dtype), fn)
end
M._new_like = new_like

-- a view of x's storage with the given descriptor fields (shares storage, adds a reference)
local function view_of(x)
  local y = ctype()
  ffi.copy(y, x, ffi.sizeof('fa_tensor'))
  y.storage = x.storage
  lib.fa_storage_retain(x.storage)
  return y
end
M._view_of = view_of

-- parse (sizes..., [opts]) or ({sizes}, [opts]); opts = dtype string or {dtype=, device=}
local function parse_args(fn, ...)
  local args = { ... }
  local shape, opts
  if type(args[1]) == 'table' and not ffi.istype(ctype, args[1]) then
    shape, opts = args[1], args[2]
  elseif ffi.istype(ctype, args[1]) then
    shape, opts = args[1]:size(), args[2]
  else
    shape = {}
    local i = 1
    while type(args[i]) == 'number' do shape[i] = args[i]; i = i + 1 end
    opts = args[i]
  end
  local dtype, device = default_dtype, -1
  if type(opts) == 'string' then
    if opts:match('^cuda') or opts == 'cpu' then device = device_id(opts, fn) else dtype = dtype_id(opts, fn) end
  elseif type(opts) == 'table' then
    dtype = dtype_id(opts.dtype, fn)
    device = device_id(opts.device, fn)
  elseif opts ~= nil then
    error(fn .. ': expected sizes, then an optional dtype or {dtype=, device=}, got ' .. type(opts), 3)
  end
  return shape, dtype, device
end

function M.empty(...) return new(parse_args('fa.empty', ...)) end
function M.zeros(...) local x = new(parse_args('fa.zeros', ...)); check(lib.fa_fill(x.desc, 0)); return x end
function M.ones(...) local x = new(parse_args('fa.ones', ...)); check(lib.fa_fill(x.desc, 1)); return x end
function M.full(shape, value, opts)
  local x = new(parse_args('fa.full', shape, opts))
  check(lib.fa_fill(x.desc, value))
  return x
end

-- like tensors keep x's dtype and device unless opts says otherwise
local function like_opts(x, opts)
  if type(opts) == 'string' then
    if opts:match('^cuda') or opts == 'cpu' then return { dtype = x.desc.dtype, device = opts } end
    return { dtype = opts, device = x.desc.device }
  end
  opts = opts or {}
  return { dtype = opts.dtype or x.desc.dtype, device = opts.device or x.desc.device }
end
function M.empty_like(x, opts) return M.empty(x:size(), like_opts(x, opts)) end
function M.zeros_like(x, opts) return M.zeros(x:size(), like_opts(x, opts)) end
function M.ones_like(x, opts) return M.ones(x:size(), like_opts(x, opts)) end
function M.full_like(x, v, opts) return M.full(x:size(), v, like_opts(x, opts)) end

-- fa.arange(n), fa.arange(a, b), fa.arange(a, b, step): [a, b) as in PyTorch; int64 when all are integers
function M.arange(a, b, step, opts)
  if type(b) ~= 'number' then a, b, step, opts = 0, a, 1, b
  elseif type(step) ~= 'number' then step, opts = 1, step end
  if step == 0 then error('fa.arange: step must be non-zero', 2) end
  local n = math.max(0, math.ceil((b - a) / step))
  local integral = a == math.floor(a) and step == math.floor(step)
  local dtype = integral and DT.int64 or default_dtype
  local device = -1
  if type(opts) == 'string' then dtype = dtype_id(opts, 'fa.arange')
  elseif type(opts) == 'table' then
    dtype = opts.dtype and dtype_id(opts.dtype, 'fa.arange') or dtype
    device = device_id(opts.device, 'fa.arange')
  end
  local x = new({ n }, DT.float64, -1, 'fa.arange')
  local p = ffi.cast('double*', x.desc.data)
  for i = 0, n - 1 do p[i] = a + i * step end
  if dtype == DT.float64 and device < 0 then return x end
  return x:to(dtype, device)
end

-- fa.tensor(nested table, [dtype | {dtype=, device=}])
function M.tensor(tbl, opts)
  if ffi.istype(ctype, tbl) then return tbl:clone() end
  if type(tbl) == 'number' or type(tbl) == 'boolean' then tbl = { tbl } end
  if type(tbl) ~= 'table' then error('fa.tensor: expected a (nested) table of numbers, got ' .. type(tbl), 2) end
  local shape, t = {}, tbl
  while type(t) == 'table' do
    shape[#shape + 1] = #t
    t = t[1]
  end
  local flat = {}
  local function walk(v, dim)
    if dim > #shape then
      if type(v) == 'boolean' then v = v and 1 or 0 end
      if type(v) ~= 'number' then error('fa.tensor: expected numbers, got ' .. type(v), 4) end
      flat[#flat + 1] = v
      return
    end
    if type(v) ~= 'table' or #v ~= shape[dim] then
      error(string.format('fa.tensor: ragged table: expected %d entries in dimension %d', shape[dim], dim), 4)
    end
    for i = 1, #v do walk(v[i], dim + 1) end
  end
  walk(tbl, 1)
  local _, dtype, device = parse_args('fa.tensor', {}, opts)
  local x = new(shape, DT.float64, -1, 'fa.tensor')
  local p = ffi.cast('double*', x.desc.data)
  for i = 1, #flat do p[i - 1] = flat[i] end
  if dtype == DT.float64 and device < 0 then return x end
  return x:to(dtype, device)
end

---------------------------------------------------------------------------- RNG
local rng = { seed = 0x2545F4914F6CDD1D, offset = 0 }
function M.manualSeed(seed)
  rng.seed = seed
  rng.offset = 0
end
function M.seed() return rng.seed end
-- reserves n counters of the global stream and returns (seed, offset)
function M._rng_take(n)
  local off = rng.offset
  rng.offset = rng.offset + n
  return rng.seed, off
end

function M.rand(...) return new(parse_args('fa.rand', ...)):uniform(0, 1) end
function M.randn(...) return new(parse_args('fa.randn', ...)):normal(0, 1) end
function M.rand_like(x, opts) return M.empty_like(x, opts):uniform(0, 1) end
function M.randn_like(x, opts) return M.empty_like(x, opts):normal(0, 1) end

function Tensor:uniform(a, b)
  a, b = a or 0, b or 1
  local seed, off = M._rng_take(self:numel())
  check(lib.fa_uniform(self.desc, a, b, seed, off), 2)
  return self
end
function Tensor:normal(mean, std)
  mean, std = mean or 0, std or 1
  local seed, off = M._rng_take(self:numel())
  check(lib.fa_normal(self.desc, mean, std, seed, off), 2)
  return self
end

---------------------------------------------------------------------------- metadata
function Tensor:dim() return self.desc.ndim end
Tensor.nDimension = Tensor.dim
function Tensor:numel()
  local n = 1
  for i = 0, self.desc.ndim - 1 do n = n * tonumber(self.desc.shape[i]) end
  return n
end
Tensor.nElement = Tensor.numel

local function norm_dim(self, d, fn, extra)
  local n = self.desc.ndim + (extra or 0)
  if type(d) ~= 'number' then error(string.format('%s: expected a dimension (1..%d), got %s', fn, n, tostring(d)), 3) end
  if d < 0 then d = d + n + 1 end
  if d < 1 or d > n or d ~= math.floor(d) then
    error(string.format('%s: dimension %s out of range for a %d-D tensor', fn, tostring(d), self.desc.ndim), 3)
  end
  return d
end
M._norm_dim = norm_dim

-- size() returns a Lua array; size(d) one size (d may be negative: -1 is the last)
function Tensor:size(d)
  if d then return tonumber(self.desc.shape[norm_dim(self, d, 'Tensor:size') - 1]) end
  local s = {}
  for i = 0, self.desc.ndim - 1 do s[i + 1] = tonumber(self.desc.shape[i]) end
  return s
end
function Tensor:stride(d)
  if d then return tonumber(self.desc.stride[norm_dim(self, d, 'Tensor:stride') - 1]) end
  local s = {}
  for i = 0, self.desc.ndim - 1 do s[i + 1] = tonumber(self.desc.stride[i]) end
  return s
end
function Tensor:dtype() return DT_NAME[self.desc.dtype] end
function Tensor:device() return device_name(self.desc.device) end
-- true for float32/float64/bfloat16/float16 (PyTorch's is_floating_point); the one dtype predicate to use
local FLOAT_DT = { [lib.FA_FLOAT32] = true, [lib.FA_FLOAT64] = true, [lib.FA_BFLOAT16] = true, [lib.FA_FLOAT16] = true }
function Tensor:isFloatingPoint() return FLOAT_DT[tonumber(self.desc.dtype)] == true end
function Tensor:deviceIndex() return self.desc.device end
function Tensor:isCuda() return self.desc.device >= 0 end
function Tensor:isContiguous()
  local d, s = self.desc, 1
  for i = d.ndim - 1, 0, -1 do
    if d.shape[i] ~= 1 and d.stride[i] ~= s then return false end
    s = s * d.shape[i]
  end
  return true
end
function Tensor:isSameSizeAs(o)
  if self.desc.ndim ~= o.desc.ndim then return false end
  for i = 0, self.desc.ndim - 1 do if self.desc.shape[i] ~= o.desc.shape[i] then return false end end
  return true
end
local function shape_str(x, sep)
  local s = x:size()
  if #s == 0 then return sep == 'x' and 'scalar' or '()' end
  return sep == 'x' and table.concat(s, 'x') or '(' .. table.concat(s, ', ') .. ')'
end
M._shape_str = shape_str

---------------------------------------------------------------------------- conversion
-- type() returns the Torch name ('fa.FloatTensor'); type(name) converts
function Tensor:type(t)
  if t == nil then return DT_TYPE[self.desc.dtype] end
  if t == 'torch.CudaTensor' or t == 'fa.CudaTensor' then return self:cuda() end
  return self:to(dtype_id(t, 'Tensor:type'))
end

-- to(dtype), to(device), to(dtype, device), to({dtype=, device=}); returns self when nothing changes
function Tensor:to(a, b)
  local dtype, device = self.desc.dtype, self.desc.device
  local function take(v)
    if v == nil then return end
    if type(v) == 'table' then
      if v.dtype then dtype = dtype_id(v.dtype, 'Tensor:to') end
      if v.device then device = device_id(v.device, 'Tensor:to') end
    elseif type(v) == 'string' and (v == 'cpu' or v:match('^cuda')) then device = device_id(v, 'Tensor:to')
    elseif type(v) == 'number' and b == nil and a == v and DT_NAME[v] == nil then device = v
    else dtype = dtype_id(v, 'Tensor:to') end
  end
  take(a)
  if type(b) == 'number' then device = b else take(b) end
  if dtype == self.desc.dtype and device == self.desc.device then return self end
  local y = new(self:size(), dtype, device, 'Tensor:to')
  check(lib.fa_copy(y.desc, self.desc), 2)
  return y
end
function Tensor:cuda(dev) return self:to(nil, dev or device_id('cuda')) end
function Tensor:cpu() return self:to('cpu') end
function Tensor:float() return self:to(DT.float32) end
function Tensor:double() return self:to(DT.float64) end
function Tensor:half() return self:to(DT.float16) end
function Tensor:bfloat16() return self:to(DT.bfloat16) end
function Tensor:long() return self:to(DT.int64) end
function Tensor:int() return self:to(DT.int32) end
function Tensor:bool() return self:to(DT.bool) end

function Tensor:contiguous()
  if self:isContiguous() then return self end
  return self:clone()
end
function Tensor:clone()
  local y = new(self:size(), self.desc.dtype, self.desc.device, 'Tensor:clone')
  check(lib.fa_copy(y.desc, self.desc), 2)
  return y
end
-- copy(src): src's values into self (same number of elements; any dtype and device)
function Tensor:copy(src)
  check(lib.fa_copy(self.desc, src.desc), 2)
  return self
end
function Tensor:fill(v)
  check(lib.fa_fill(self.desc, v), 2)
  return self
end
function Tensor:zero() return self:fill(0) end

-- resize to a shape (a table or sizes); reallocates only when the storage is too small; contents undefined
function Tensor:resize(...)
  local shape = type(...) == 'table' and (...) or { ... }
  local n = 1
  for _, s in ipairs(shape) do n = n * s end
  local same = #shape == self.desc.ndim
  for i = 1, #shape do same = same and self.desc.shape[i - 1] == shape[i] end
  if same and self:isContiguous() then return self end
  local need = n * lib.fa_dtype_size(self.desc.dtype)
  local base = ffi.cast('char*', self.desc.data) - ffi.cast('char*', self.storage.data)
  if self.storage.nbytes - base < need then
    local y = new(shape, self.desc.dtype, self.desc.device, 'Tensor:resize')
    lib.fa_storage_release(self.storage)
    self.storage = y.storage
    lib.fa_storage_retain(y.storage)
    self.desc.data = y.desc.data
  end
  self.desc.ndim = #shape
  for i = 1, #shape do self.desc.shape[i - 1] = shape[i] end
  contiguous_strides(self)
  return self
end
function Tensor:resizeAs(o) return self:resize(o:size()) end

---------------------------------------------------------------------------- views
local function sizes_arg(fn, ...)
  local a = ...
  if type(a) == 'table' and not ffi.istype(ctype, a) then return a end
  if ffi.istype(ctype, a) then return a:size() end
  return { ... }
end

-- view(sizes): same storage, new shape; one size may be -1. Needs a contiguous tensor.
function Tensor:view(...)
  local shape = sizes_arg('Tensor:view', ...)
  local n, infer = 1, nil
  shape = { unpack(shape) }
  for i, s in ipairs(shape) do
    if s == -1 then
      if infer then error('Tensor:view: only one size may be -1', 2) end
      infer = i
    else n = n * s end
  end
  local numel = self:numel()
  if infer then
    if n == 0 or numel % n ~= 0 then error(string.format('Tensor:view: cannot infer size -1 for %d elements from %s', numel, table.concat(shape, 'x')), 2) end
    shape[infer] = numel / n
    n = numel
  end
  if n ~= numel then
    error(string.format('Tensor:view: shape %s has %d elements, the tensor %s has %d', table.concat(shape, 'x'), n,
          shape_str(self, 'x'), numel), 2)
  end
  if not self:isContiguous() then
    error('Tensor:view: the tensor of size ' .. shape_str(self, 'x') .. ' is not contiguous; call :contiguous() or use :reshape()', 2)
  end
  local y = view_of(self)
  y.desc.ndim = #shape
  for i = 1, #shape do y.desc.shape[i - 1] = shape[i] end
  contiguous_strides(y)
  return y
end
function Tensor:reshape(...)
  if self:isContiguous() then return self:view(...) end
  return self:clone():view(...)
end
function Tensor:viewAs(o) return self:view(o:size()) end
function Tensor:flatten() return self:reshape(self:numel()) end

-- narrow(dim, start, length): 1-based start
function Tensor:narrow(dim, start, len)
  dim = norm_dim(self, dim, 'Tensor:narrow')
  local n = self:size(dim)
  if start < 1 or len < 0 or start + len - 1 > n then
    error(string.format('Tensor:narrow: range [%d, %d] out of bounds for size %d in dimension %d', start, start + len - 1, n, dim), 2)
  end
  local y = view_of(self)
  local es = lib.fa_dtype_size(self.desc.dtype)
  y.desc.data = ffi.cast('char*', self.desc.data) + (start - 1) * self.desc.stride[dim - 1] * es
  y.desc.shape[dim - 1] = len
  return y
end

-- select(dim, index): removes dim
function Tensor:select(dim, idx)
  dim = norm_dim(self, dim, 'Tensor:select')
  local n = self:size(dim)
  if idx < 0 then idx = idx + n + 1 end
  if idx < 1 or idx > n then
    error(string.format('Tensor:select: index %d out of range for size %d in dimension %d', idx, n, dim), 2)
  end
  local y = self:narrow(dim, idx, 1)
  local d = y.desc
  for i = dim - 1, d.ndim - 2 do
    d.shape[i] = d.shape[i + 1]
    d.stride[i] = d.stride[i + 1]
  end
  d.ndim = d.ndim - 1
  return y
end

function Tensor:transpose(a, b)
  a, b = norm_dim(self, a, 'Tensor:transpose'), norm_dim(self, b, 'Tensor:transpose')
  local y = view_of(self)
  local d = y.desc
  d.shape[a - 1], d.shape[b - 1] = d.shape[b - 1], d.shape[a - 1]
  d.stride[a - 1], d.stride[b - 1] = d.stride[b - 1], d.stride[a - 1]
  return y
end
function Tensor:t()
  if self.desc.ndim ~= 2 then error('Tensor:t: expected a 2-D tensor, got ' .. self.desc.ndim .. '-D', 2) end
  return self:transpose(1, 2)
end

function Tensor:permute(...)
  local p = sizes_arg('Tensor:permute', ...)
  if #p ~= self.desc.ndim then error(string.format('Tensor:permute: expected %d dimensions, got %d', self.desc.ndim, #p), 2) end
  local y = view_of(self)
  local seen = {}
  for i, s in ipairs(p) do
    s = norm_dim(self, s, 'Tensor:permute')
    if seen[s] then error('Tensor:permute: dimension ' .. s .. ' repeated', 2) end
    seen[s] = true
    y.desc.shape[i - 1] = self.desc.shape[s - 1]
    y.desc.stride[i - 1] = self.desc.stride[s - 1]
  end
  return y
end

function Tensor:unsqueeze(dim)
  dim = norm_dim(self, dim, 'Tensor:unsqueeze', 1)
  if self.desc.ndim >= 8 then error('Tensor:unsqueeze: at most 8 dimensions', 2) end
  local y = view_of(self)
  local d = y.desc
  for i = d.ndim, dim, -1 do
    d.shape[i] = d.shape[i - 1]
    d.stride[i] = d.stride[i - 1]
  end
  d.shape[dim - 1] = 1
  d.stride[dim - 1] = dim < self.desc.ndim + 1 and self.desc.shape[dim - 1] * self.desc.stride[dim - 1] or 1
  d.ndim = d.ndim + 1
  return y
end

-- squeeze() drops every size-1 dim; squeeze(dim) that one (if its size is 1)
function Tensor:squeeze(dim)
  local shape, stride = {}, {}
  if dim then dim = norm_dim(self, dim, 'Tensor:squeeze') end
  for i = 1, self.desc.ndim do
    local s = tonumber(self.desc.shape[i - 1])
    if not (s == 1 and (dim == nil or dim == i)) then
      shape[#shape + 1] = s
      stride[#stride + 1] = tonumber(self.desc.stride[i - 1])
    end
  end
  local y = view_of(self)
  y.desc.ndim = #shape
  for i = 1, #shape do y.desc.shape[i - 1], y.desc.stride[i - 1] = shape[i], stride[i] end
  return y
end

-- expand(sizes): size-1 dims broadcast with stride 0 (-1 keeps a size); new leading dims allowed
function Tensor:expand(...)
  local shape = sizes_arg('Tensor:expand', ...)
  local nd, od = #shape, self.desc.ndim
  if nd < od then error(string.format('Tensor:expand: cannot expand %s to %d dimensions', shape_str(self, 'x'), nd), 2) end
  local y = view_of(self)
  y.desc.ndim = nd
  for i = nd, 1, -1 do
    local j = i - (nd - od)
    local want = shape[i]
    if j >= 1 then
      local have = tonumber(self.desc.shape[j - 1])
      if want == -1 then want = have end
      if have == want then
        y.desc.shape[i - 1], y.desc.stride[i - 1] = have, self.desc.stride[j - 1]
      elseif have == 1 then
        y.desc.shape[i - 1], y.desc.stride[i - 1] = want, 0
      else
        error(string.format('Tensor:expand: cannot expand size %d to %d in dimension %d', have, want, j), 2)
      end
    else
      y.desc.shape[i - 1], y.desc.stride[i - 1] = want, 0
    end
  end
  return y
end
function Tensor:expandAs(o) return self:expand(o:size()) end

---------------------------------------------------------------------------- element access
local function elem_offset(self, fn, ...)
  local idx = { ... }
  if #idx ~= self.desc.ndim then
    error(string.format('%s: expected %d indices, got %d', fn, self.desc.ndim, #idx), 3)
  end
  local off = 0
  for i, v in ipairs(idx) do
    local n = tonumber(self.desc.shape[i - 1])
    if v < 0 then v = v + n + 1 end
    if v < 1 or v > n then error(string.format('%s: index %d out of range for size %d in dimension %d', fn, v, n, i), 3) end
    off = off + (v - 1) * tonumber(self.desc.stride[i - 1])
  end
  return off
end

-- a 1-element CPU float64/int64 copy of one element, read back as a number
local function read_one(self, off)
  local dt = self.desc.dtype
  if self.desc.device < 0 and dt ~= DT.bfloat16 and dt ~= DT.float16 then
    local v = ffi.cast(DT_PTR[dt], self.desc.data)[off]
    return tonumber(v)
  end
  local src = view_of(self)
  src.desc.data = ffi.cast('char*', self.desc.data) + off * lib.fa_dtype_size(dt)
  src.desc.ndim = 0
  local dst = new({}, dt == DT.int64 and DT.int64 or DT.float64, -1, 'Tensor:get')
  check(lib.fa_copy(dst.desc, src.desc), 3)
  return tonumber(ffi.cast(DT_PTR[dst.desc.dtype], dst.desc.data)[0])
end

function Tensor:get(...) return read_one(self, elem_offset(self, 'Tensor:get', ...)) end
function Tensor:set(...)
  local args = { ... }
  local v = table.remove(args)
  local off = elem_offset(self, 'Tensor:set', unpack(args))
  local y = view_of(self)
  y.desc.data = ffi.cast('char*', self.desc.data) + off * lib.fa_dtype_size(self.desc.dtype)
  y.desc.ndim = 0
  check(lib.fa_fill(y.desc, v), 2)
  return self
end
-- item(): the value of a 1-element tensor
function Tensor:item()
  if self:numel() ~= 1 then error('Tensor:item: expected a 1-element tensor, got size ' .. shape_str(self, 'x'), 2) end
  local off = 0
  return read_one(self, off)
end

-- table(): nested Lua tables (a number for a 0-D tensor)
function Tensor:table()
  local x = self
  if x.desc.device >= 0 or x.desc.dtype == DT.bfloat16 or x.desc.dtype == DT.float16 then
    x = x:to(x.desc.dtype == DT.int64 and DT.int64 or (x.desc.dtype == DT.int32 and DT.int32 or DT.float64), -1)
  end
  local p = ffi.cast(DT_PTR[x.desc.dtype], x.desc.data)
  local isbool = x.desc.dtype == DT.bool
  local function rec(dim, off)
    if dim == x.desc.ndim then
      local v = tonumber(p[off])
      if isbool then return v ~= 0 end
      return v
    end
    local t = {}
    for i = 0, tonumber(x.desc.shape[dim]) - 1 do t[i + 1] = rec(dim + 1, off + i * tonumber(x.desc.stride[dim])) end
    return t
  end
  return rec(0, 0)
end
Tensor.totable = Tensor.table

---------------------------------------------------------------------------- printing
local function fmt_numbers(vals, integral)
  if integral then
    return function(v) return string.format('%d', v) end
  end
  local maxabs, allint = 0, true
  for _, v in ipairs(vals) do
    if v == v and math.abs(v) ~= math.huge then
      maxabs = math.max(maxabs, math.abs(v))
      if v ~= math.floor(v) then allint = false end
    end
  end
  if allint and maxabs < 1e9 then return function(v) return v ~= v and 'nan' or string.format('%.0f', v) end end
  if maxabs >= 1e5 or (maxabs < 1e-4 and maxabs > 0) then return function(v) return string.format('%.4e', v) end end
  return function(v) return string.format('%.4f', v) end
end

function Tensor:__tostring()
  local header = string.format('[%s of size %s%s]', DT_TYPE[self.desc.dtype], shape_str(self, 'x'),
                               self.desc.device >= 0 and (' (' .. device_name(self.desc.device) .. ')') or '')
  local n = self:numel()
  if n == 0 then return header end
  local x = self:to(self.desc.dtype == DT.int64 and DT.int64 or (self.desc.dtype == DT.int32 and DT.int32 or DT.float64), -1)
  local integral = x.desc.dtype ~= DT.float64
  local summarise = n > 1000
  local edge = 3
  local p = ffi.cast(DT_PTR[x.desc.dtype], x.desc.data)
  -- collect values that will be shown, to choose a common format and width
  local shown = {}
  local function indices(size)
    if summarise and size > 2 * edge then
      local r = {}
      for i = 0, edge - 1 do r[#r + 1] = i end
      r[#r + 1] = false
      for i = size - edge, size - 1 do r[#r + 1] = i end
      return r
    end
    local r = {}
    for i = 0, size - 1 do r[#r + 1] = i end
    return r
  end
  local nd = x.desc.ndim
  local function collect(dim, off)
    if dim == nd then shown[#shown + 1] = tonumber(p[off]); return end
    for _, i in ipairs(indices(tonumber(x.desc.shape[dim]))) do
      if i then collect(dim + 1, off + i * tonumber(x.desc.stride[dim])) end
    end
  end
  collect(0, 0)
  local f = fmt_numbers(shown, integral)
  local width = 0
  for _, v in ipairs(shown) do width = math.max(width, #f(v)) end
  local lines = {}
  local function row(off)
    local parts = {}
    local last = nd - 1
    for _, i in ipairs(indices(tonumber(x.desc.shape[last]))) do
      if i then
        local s = f(tonumber(p[off + i * tonumber(x.desc.stride[last])]))
        parts[#parts + 1] = string.rep(' ', width - #s) .. s
      else parts[#parts + 1] = '...' end
    end
    return ' ' .. table.concat(parts, ' ')
  end
  if nd == 0 then
    lines[1] = ' ' .. f(tonumber(p[0]))
  elseif nd == 1 then
    for _, i in ipairs(indices(tonumber(x.desc.shape[0]))) do
      lines[#lines + 1] = i and (' ' .. f(tonumber(p[i * tonumber(x.desc.stride[0])]))) or ' ...'
    end
  else
    local function mats(dim, off, prefix)
      if dim == nd - 2 then
        if prefix ~= '' then lines[#lines + 1] = '(' .. prefix .. ',.,.) = ' end
        for _, i in ipairs(indices(tonumber(x.desc.shape[dim]))) do
          lines[#lines + 1] = i and row(off + i * tonumber(x.desc.stride[dim])) or ' ...'
        end
        if prefix ~= '' then lines[#lines + 1] = '' end
        return
      end
      for _, i in ipairs(indices(tonumber(x.desc.shape[dim]))) do
        if i then
          mats(dim + 1, off + i * tonumber(x.desc.stride[dim]), prefix == '' and tostring(i + 1) or (prefix .. ',' .. (i + 1)))
        else lines[#lines + 1] = '...'; lines[#lines + 1] = '' end
      end
    end
    mats(0, 0, '')
  end
  if lines[#lines] == '' then lines[#lines] = nil end
  return table.concat(lines, '\n') .. '\n' .. header
end

---------------------------------------------------------------------------- metatype
local methods = Tensor
local mt = {
  __gc = function(self) lib.fa_storage_release(self.storage) end,
  __tostring = Tensor.__tostring,
  __index = function(self, k)
    local m = methods[k]
    if m ~= nil then return m end
    if type(k) == 'number' then
      if self.desc.ndim == 1 then return self:get(k) end
      return self:select(1, k)
    end
    return nil
  end,
  __newindex = function(self, k, v)
    if type(k) ~= 'number' then error('fa.Tensor: cannot set field ' .. tostring(k), 2) end
    if self.desc.ndim == 1 then self:set(k, v)
    elseif type(v) == 'number' then self:select(1, k):fill(v)
    else self:select(1, k):copy(v) end
  end,
  __len = function(self) return self.desc.ndim > 0 and tonumber(self.desc.shape[0]) or 0 end,
}
M._mt = mt
ctype = ffi.metatype('fa_Tensor', mt)
M._ctype = ctype

function M.isTensor(x) return ffi.istype(ctype, x) end
require('fastattn.errors').isTensor = M.isTensor

registry.fastattn_tensor = M
return M

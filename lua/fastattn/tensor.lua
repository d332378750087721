-- tensor.lua: fa.Tensor, an ffi.metatype object holding an fa_tensor descriptor and one reference to a
-- ref-counted fa_storage (DESIGN §3). Views share the storage. Dims and indices are 1-based, as in Torch7.
-- Every argument is checked here before a descriptor is written or memory touched; messages go through
-- fa.errors (raised at the caller's line). set_desc is the one writer of a descriptor's ndim/shape/stride.
local ffi = require 'ffi'
local lib = require 'fastattn.ffi'
local E = require 'fastattn.errors'

-- The metatype and the RNG state exist once per Lua state: when the module is loaded again (busted's
-- insulation, or a user clearing package.loaded) return the first instance instead of a second RNG.
local registry = debug.getregistry()
if registry.fastattn_tensor then return registry.fastattn_tensor end

local M = {}          -- module-level functions (merged into `fa` by init.lua)
local Tensor = {}     -- methods
M.Tensor = Tensor

local floor, huge = math.floor, math.huge
local MAX_DIMS = tonumber(lib.FA_MAX_DIMS)
local MAX_NUMEL = 2 ^ 53 -- element counts and offsets stay exact in a Lua number (and in int64)

---------------------------------------------------------------------------- dtypes and devices
local DT = { float32 = lib.FA_FLOAT32, float64 = lib.FA_FLOAT64, bfloat16 = lib.FA_BFLOAT16, float16 = lib.FA_FLOAT16,
             int32 = lib.FA_INT32, int64 = lib.FA_INT64, bool = lib.FA_BOOL }
for k, v in pairs(DT) do DT[k] = tonumber(v) end
local DT_ALIAS = { float = 'float32', double = 'float64', half = 'float16', bf16 = 'bfloat16', int = 'int32',
                   long = 'int64', byte = 'bool' }
local DT_NAME, DT_TYPE = {}, {}
for k, v in pairs(DT) do DT_NAME[v] = k end
local TYPE_NAME = { float32 = 'FloatTensor', float64 = 'DoubleTensor', bfloat16 = 'BFloat16Tensor', float16 = 'HalfTensor',
                    int32 = 'IntTensor', int64 = 'LongTensor', bool = 'BoolTensor' }
for k, v in pairs(DT) do DT_TYPE[v] = 'fa.' .. TYPE_NAME[k] end
local TYPE_DT = {}
for k, v in pairs(DT_TYPE) do TYPE_DT[v] = k; TYPE_DT[v:gsub('^fa%.', 'torch.')] = k end
local DT_PTR = { [DT.float32] = 'float*', [DT.float64] = 'double*', [DT.bfloat16] = 'uint16_t*', [DT.float16] = 'uint16_t*',
                 [DT.int32] = 'int32_t*', [DT.int64] = 'int64_t*', [DT.bool] = 'uint8_t*' }
M.dtypes = DT
local FLOAT_DT = { [DT.float32] = true, [DT.float64] = true, [DT.bfloat16] = true, [DT.float16] = true }

local default_dtype = DT.float32
local DTYPE_EXPECTED = "a dtype ('float32', 'float64', 'bfloat16', 'float16', 'int32', 'int64' or 'bool')"

-- dtype id from a name ('float32', 'double', 'fa.FloatTensor', ...) or an id; nil gives the default dtype
local function dtype_id(d, fn, name)
  if d == nil then return default_dtype end
  if type(d) == 'number' and DT_NAME[d] then return d end
  if type(d) == 'string' then
    local id = DT[d] or DT[DT_ALIAS[d] or ''] or TYPE_DT[d]
    if id then return id end
  end
  E.argv(fn or 'fa.tensor', name or 'dtype', DTYPE_EXPECTED, d)
end
M.dtype_id = dtype_id

-- the devices a tensor can be put on, for messages
local function devices_expected()
  local n = tonumber(lib.fa_cuda_device_count())
  if n > 0 then return string.format("'cpu', 'cuda' or 'cuda:N' with N in 0..%d", n - 1) end
  return "'cpu' (" .. (lib.fa_has_cuda() ~= 0 and 'no CUDA device is visible'
                       or 'this fastattn was built without CUDA') .. ')'
end

-- device index (-1 = CPU) from 'cpu', 'cuda', 'cuda:N', a number (-1 or a 0-based CUDA ordinal) or nil; a CUDA
-- device must exist
local function device_id(d, fn, name)
  if d == nil or d == 'cpu' then return -1 end
  local i
  if type(d) == 'number' then
    if d == floor(d) and d >= -1 and d < 2 ^ 31 then i = d end
  elseif d == 'cuda' then
    i = tonumber(lib.fa_cuda_get_device())
    if i < 0 then i = 0 end
  elseif type(d) == 'string' then
    i = tonumber(d:match('^cuda:(%d+)$'))
  end
  if i and (i == -1 or i < tonumber(lib.fa_cuda_device_count())) then return i end
  E.argv(fn or 'fa.tensor', name or 'device', devices_expected(), d)
end
M.device_id = device_id

local function device_name(id) return id < 0 and 'cpu' or ('cuda:' .. id) end

function M.setDefaultDtype(d)
  local id = dtype_id(d, 'fa.setDefaultDtype', 'dtype')
  if d == nil or not FLOAT_DT[id] then
    E.argv('fa.setDefaultDtype', 'dtype', "a floating-point dtype ('float32', 'float64', 'bfloat16' or 'float16')", d)
  end
  default_dtype = id
end
function M.getDefaultDtype() return DT_NAME[default_dtype] end

---------------------------------------------------------------------------- errors
-- fa.check(rc, fn, rename): kept for the modules that call it; E.check when given the Lua function name,
-- otherwise the C message as it is. Either way raised at the user's line.
function M.check(rc, fn, rename)
  if rc == 0 then return end
  if type(fn) == 'string' then return E.check(rc, fn, rename) end
  E.raise(ffi.string(lib.fa_last_error()))
end
local check = E.check

---------------------------------------------------------------------------- descriptors
local ctype -- set below by ffi.metatype

local function shape_text(shape)
  if #shape == 0 then return '[]' end
  local s = {}
  for i = 1, #shape do s[i] = type(shape[i]) == 'number' and E.describe(shape[i]) or tostring(shape[i]) end
  return table.concat(s, 'x')
end

-- checks a Lua array of sizes (at most 8 non-negative integers, fewer than 2^53 elements in all); returns numel
local function check_shape(fn, name, shape)
  local n = #shape
  if n > MAX_DIMS then E.arg(fn, name, 'at most ' .. MAX_DIMS .. ' dimensions', n .. ' (size ' .. shape_text(shape) .. ')') end
  local numel = 1
  for i = 1, n do
    local s = shape[i]
    if type(s) ~= 'number' or s ~= floor(s) or s < 0 or s >= MAX_NUMEL then
      E.argv(fn, name, 'a non-negative integer size in dimension ' .. i, s)
    end
    numel = numel * s
  end
  if numel >= MAX_NUMEL then
    E.arg(fn, name, 'fewer than 2^53 elements', string.format('size %s (%.4g elements)', shape_text(shape), numel))
  end
  return numel
end
M._check_shape = check_shape

-- The one writer of a descriptor's ndim, shape and stride, so that no path can write past shape[8]/stride[8]:
-- shape is a Lua array or a descriptor (its shape copied), stride a Lua array or nil (contiguous). Everything is
-- checked (rank, sizes, strides, element count) before the first field is written. Returns numel.
local function set_desc(d, shape, stride, fn, name)
  if type(shape) == 'cdata' then -- a live descriptor, checked when it was filled: copy its sizes (hot path, no tables)
    local src = shape
    local n = src.ndim
    if n < 0 or n > MAX_DIMS then E.raise(string.format('%s: internal error: a descriptor of %d dimensions', fn, n)) end
    d.ndim = n
    local numel = 1
    for i = n - 1, 0, -1 do
      local v = tonumber(src.shape[i])
      d.shape[i] = v
      d.stride[i] = numel
      numel = numel * v
    end
    return numel
  end
  local n = #shape
  local numel
  numel = check_shape(fn, name or 'size', shape)
  if stride then
    if #stride ~= n then E.raise(string.format('%s: internal error: %d strides for %d sizes', fn, #stride, n)) end
    for i = 1, n do
      local s = stride[i]
      if type(s) ~= 'number' or s ~= floor(s) or s < 0 or s >= MAX_NUMEL then
        E.raise(string.format('%s: internal error: stride %s in dimension %d', fn, tostring(s), i))
      end
    end
  end
  d.ndim = n
  local s = 1
  for i = n, 1, -1 do
    d.shape[i - 1] = shape[i]
    if stride then d.stride[i - 1] = stride[i] else d.stride[i - 1] = s; s = s * shape[i] end
  end
  return numel
end
M._set_desc = set_desc

-- sizes and strides of x as Lua arrays
local function dims(x)
  local d, shape, stride = x.desc, {}, {}
  for i = 1, d.ndim do shape[i] = tonumber(d.shape[i - 1]); stride[i] = tonumber(d.stride[i - 1]) end
  return shape, stride
end

-- an output written in place must not have two elements at one address (an expanded view: stride 0 over a size
-- > 1), or the result depends on the order of the writes (PyTorch refuses these too)
local function check_writable(fn, x, name)
  local d = x.desc
  for i = 0, d.ndim - 1 do if d.shape[i] == 0 then return end end
  for i = 0, d.ndim - 1 do
    if d.stride[i] == 0 and d.shape[i] > 1 then
      E.raise(string.format("%s: argument '%s': expected a tensor whose elements are distinct in memory, got an expanded " ..
                            'view (stride 0 in dimension %d of size %s); write into a :clone() of it', fn, name or 'self', i + 1,
                            shape_text(dims(x))))
    end
  end
end
M._check_writable = check_writable

-- an input of an in-place op that shares memory with the output, other than as the output itself, is read from a copy:
-- read in place, x:add_(x:t()) or x:add_(x[1]) would see elements the op has already written. (The test is on byte
-- ranges, so interleaved views that share no element are copied too; that costs a copy, never a wrong result.)
local function byte_range(x)
  local d, hi = x.desc, 0
  for i = 0, d.ndim - 1 do
    if d.shape[i] == 0 then return nil end
    hi = hi + (tonumber(d.shape[i]) - 1) * tonumber(d.stride[i])
  end
  local lo = ffi.cast('char*', d.data)
  return lo, lo + (hi + 1) * lib.fa_dtype_size(d.dtype)
end
-- whether two tensors' elements may share memory (same storage, intersecting byte ranges)
local function overlaps(a, b)
  if a == nil or b == nil or a.storage ~= b.storage then return false end
  local a0, a1 = byte_range(a)
  local b0, b1 = byte_range(b)
  return a0 ~= nil and b0 ~= nil and a0 < b1 and b0 < a1
end
M._overlaps = overlaps
local function unaliased(out, x)
  if not ffi.istype(ctype, x) or out.storage ~= x.storage then return x end
  local od, xd = out.desc, x.desc
  if od.data == xd.data and od.ndim == xd.ndim and od.dtype == xd.dtype then
    local same = true
    for i = 0, od.ndim - 1 do same = same and od.shape[i] == xd.shape[i] and od.stride[i] == xd.stride[i] end
    if same then return x end
  end
  if not overlaps(out, x) then return x end
  local y = M._new(x:size(), x.desc.dtype, x.desc.device, 'Tensor:clone') -- (defined below)
  check(lib.fa_copy(y.desc, x.desc), 'Tensor:clone')
  return y
end
M._unaliased = unaliased

---------------------------------------------------------------------------- construction
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
-- the bytes of memory and swap of this machine (Linux: /proc/meminfo, read once), false where unknown
local host_bytes
local function host_memory()
  if host_bytes == nil then
    host_bytes = false
    local f = io.open('/proc/meminfo')
    if f then
      local s = f:read('*a')
      f:close()
      local mem, swap = s:match('MemTotal:%s*(%d+) kB'), s:match('SwapTotal:%s*(%d+) kB')
      if mem then host_bytes = (tonumber(mem) + (tonumber(swap) or 0)) * 1024 end
    end
  end
  return host_bytes
end
M._host_memory = host_memory
-- whether nbytes on the CPU exceed memory and swap: refused before they are asked for (where memory is
-- overcommitted the allocation would succeed and the process be killed when the pages are touched)
local function beyond_host(nbytes)
  local host = host_memory()
  return host and nbytes > host
end
M._beyond_host = beyond_host

local function alloc_storage(x, device, nbytes, fn)
  if device < 0 and beyond_host(nbytes) then
    E.fail(fn or 'fa.empty', 'out of CPU memory allocating %d bytes', nbytes) -- (as the C allocator says it)
  end
  local st = lib.fa_storage_new(device, nbytes)
  if st == nil then
    if device >= 0 then collectgarbage('collect'); st = lib.fa_storage_new(device, nbytes) end
    if st == nil then check(lib.FA_ERR_MEMORY, fn or 'fa.empty') end
  end
  x.storage = st
  x.desc.data = st.data
  if device >= 0 then after_cuda_alloc(device, nbytes)
  else after_cpu_alloc(nbytes) end
  return x
end

-- a new, uninitialised, contiguous tensor of the given shape (a Lua array of sizes, checked here)
local function new(shape, dtype, device, fn)
  local x = ctype()
  local d = x.desc
  d.dtype, d.device = dtype, device
  local numel = set_desc(d, shape, nil, fn or 'fa.empty', 'size')
  return alloc_storage(x, device, numel * lib.fa_dtype_size(dtype), fn)
end
M._new = new

-- a new, uninitialised, contiguous tensor of src's shape (src a tensor), of the given dtype and device
-- (src's when nil): the hot path of elementwise ops
local function new_like(src, dtype, device, fn)
  local sd = src.desc
  dtype, device = dtype or sd.dtype, device or sd.device
  local x = ctype()
  local d = x.desc
  d.dtype, d.device = dtype, device
  local numel = set_desc(d, sd, nil, fn or 'fa.empty')
  return alloc_storage(x, device, numel * lib.fa_dtype_size(dtype), fn)
end
M._new_like = new_like

-- a view of x's storage with x's descriptor (shares storage, adds a reference); callers change it through set_desc
local function view_of(x)
  local y = ctype()
  ffi.copy(y, x, ffi.sizeof('fa_tensor'))
  y.storage = x.storage
  lib.fa_storage_retain(x.storage)
  return y
end
M._view_of = view_of

local OPT_KEYS = { dtype = true, device = true }

-- (dtype, device) from a dtype or device string or {dtype=, device=}; defaults when absent
local function dtype_device(fn, opts, dtype, device)
  if type(opts) == 'string' then
    if opts == 'cpu' or opts:match('^cuda') then device = device_id(opts, fn, 'device')
    else dtype = dtype_id(opts, fn, 'dtype') end
  elseif type(opts) == 'table' and not ffi.istype(ctype, opts) then
    E.opts(fn, 'options', opts, OPT_KEYS)
    if opts.dtype ~= nil then dtype = dtype_id(opts.dtype, fn, 'dtype') end
    if opts.device ~= nil then device = device_id(opts.device, fn, 'device') end
  elseif opts ~= nil then
    E.argv(fn, 'options', "a dtype, a device or {dtype=, device=}", opts)
  end
  return dtype, device
end

-- sizes as numbers, one Lua array or a tensor (its size): returns a fresh Lua array and the index of the next argument
local function sizes_args(fn, ...)
  local a = ...
  if ffi.istype(ctype, a) then return a:size(), 2 end
  if type(a) == 'table' then
    local t, n = {}, #a
    for k in pairs(a) do -- {dtype = 'float64'} where sizes belong is no 0-D shape
      if type(k) ~= 'number' or k < 1 or k > n or k ~= floor(k) then
        E.arg(fn, 'size', 'a Lua array of sizes', 'a table with the key ' .. E.describe(k))
      end
    end
    for i = 1, n do t[i] = a[i] end
    return t, 2
  end
  local shape, i, n = {}, 1, select('#', ...)
  while i <= n do
    local v = select(i, ...)
    if type(v) ~= 'number' then break end
    shape[i] = v
    i = i + 1
  end
  return shape, i
end

-- (sizes..., [opts]) or ({sizes}, [opts]); opts = dtype or device string or {dtype=, device=}
local function parse_args(fn, ...)
  local shape, i = sizes_args(fn, ...)
  local n = select('#', ...)
  local opts = i <= n and select(i, ...) or nil
  for j = i + 1, n do
    if select(j, ...) ~= nil then
      E.argv(fn, 'options', 'nothing after the options (sizes, then a dtype, a device or {dtype=, device=})',
             select(j, ...))
    end
  end
  local dtype, device = dtype_device(fn, opts, default_dtype, -1)
  return shape, dtype, device, fn
end

-- a fill value: a number (NaN and inf included: they are values) or a boolean
local function value_arg(fn, name, v)
  if type(v) == 'boolean' then return v and 1 or 0 end
  if type(v) ~= 'number' then E.argv(fn, name, 'a number', v) end
  return v
end

local function fill(x, v, fn, rename)
  check(lib.fa_fill(x.desc, v), fn, rename or { dst = 'self' })
  return x
end

function M.empty(...) return new(parse_args('fa.empty', ...)) end
function M.zeros(...) return fill(new(parse_args('fa.zeros', ...)), 0, 'fa.zeros') end
function M.ones(...) return fill(new(parse_args('fa.ones', ...)), 1, 'fa.ones') end
function M.full(shape, value, opts)
  local fn = 'fa.full'
  if not (type(shape) == 'table' or type(shape) == 'number') then E.argv(fn, 'size', 'a table of sizes or a tensor', shape) end
  value = value_arg(fn, 'value', value)
  local x = new(parse_args(fn, shape, opts))
  return fill(x, value, fn, { dst = 'value' })
end

-- like tensors keep x's dtype and device unless opts says otherwise
local function like(fn, x, opts)
  E.tensor(fn, 'input', x)
  local dtype, device = dtype_device(fn, opts, x.desc.dtype, x.desc.device)
  return x:size(), dtype, device, fn
end
function M.empty_like(x, opts) return new(like('fa.empty_like', x, opts)) end
function M.zeros_like(x, opts) return fill(new(like('fa.zeros_like', x, opts)), 0, 'fa.zeros_like') end
function M.ones_like(x, opts) return fill(new(like('fa.ones_like', x, opts)), 1, 'fa.ones_like') end
function M.full_like(x, v, opts)
  local fn = 'fa.full_like'
  E.tensor(fn, 'input', x)
  v = value_arg(fn, 'value', v)
  return fill(new(like(fn, x, opts)), v, fn, { dst = 'value' })
end

local function finite(fn, name, v)
  if type(v) ~= 'number' or v ~= v or v == huge or v == -huge then E.argv(fn, name, 'a finite number', v) end
  return v
end

-- fa.arange(n), fa.arange(a, b), fa.arange(a, b, step): [a, b) as in PyTorch; int64 when all are integers
function M.arange(a, b, step, opts)
  local fn = 'fa.arange'
  if type(b) ~= 'number' then
    if step ~= nil then E.argv(fn, 'end', 'a number', b) end
    a, b, step, opts = 0, a, 1, b
    finite(fn, 'end', b)
  else
    finite(fn, 'start', a)
    finite(fn, 'end', b)
    if type(step) ~= 'number' then
      if opts ~= nil then E.argv(fn, 'step', 'a number', step) end
      step, opts = 1, step
    end
  end
  finite(fn, 'step', step)
  if step == 0 then E.arg(fn, 'step', 'a non-zero number', '0') end
  if (b - a) * step < 0 then
    E.arg(fn, 'step', string.format('a step of the sign of end - start (%s)', E.describe(b - a)), E.describe(step))
  end
  local count = math.ceil((b - a) / step)
  if count >= MAX_NUMEL then
    E.arg(fn, 'step', 'fewer than 2^53 values from start to end', string.format('%.4g values', count))
  end
  local integral = a == floor(a) and b == floor(b) and step == floor(step)
  local dtype, device = dtype_device(fn, opts, integral and DT.int64 or default_dtype, -1)
  local x = new({ count }, DT.float64, -1, fn)
  local p = ffi.cast('double*', x.desc.data)
  for i = 0, count - 1 do p[i] = a + i * step end
  if dtype == DT.float64 and device < 0 then return x end
  return x:to(dtype, device)
end

-- fa.tensor(nested table, [dtype | {dtype=, device=}]): numbers (float32 by default) or booleans (bool)
local INT_LIMIT = { [DT.int32] = 2 ^ 31, [DT.int64] = 2 ^ 63 } -- integers in [-lim, lim)
local function tensor(fn, tbl, opts)
  if ffi.istype(ctype, tbl) then
    local dtype, device = dtype_device(fn, opts, tbl.desc.dtype, tbl.desc.device)
    local y = new(tbl:size(), dtype, device, fn)
    check(lib.fa_copy(y.desc, tbl.desc), fn)
    return y
  end
  if type(tbl) == 'number' or type(tbl) == 'boolean' then tbl = { tbl } end
  if type(tbl) ~= 'table' then E.argv(fn, 'data', 'a (nested) table of numbers or booleans', tbl) end
  local shape, t = {}, tbl
  while type(t) == 'table' and not ffi.istype(ctype, t) do
    if #shape == MAX_DIMS then E.arg(fn, 'data', 'at most ' .. MAX_DIMS .. ' levels of nesting', 'more') end
    shape[#shape + 1] = #t
    t = t[1]
  end
  local flat, kind = {}, nil
  local function where(path) return '[' .. table.concat(path, '][') .. ']' end
  local path = {}
  local function walk(v, dim)
    if dim > #shape then
      local k = type(v) == 'boolean' and 'boolean' or type(v) == 'number' and 'number' or nil
      if not k or (kind and k ~= kind) then
        E.arg(fn, 'data', (kind and kind .. 's' or 'numbers or booleans') .. ' (all of one kind)',
              E.describe(v) .. ' at ' .. where(path))
      end
      kind = k
      flat[#flat + 1] = k == 'boolean' and (v and 1 or 0) or v
      return
    end
    if type(v) ~= 'table' or ffi.istype(ctype, v) or #v ~= shape[dim] then
      E.arg(fn, 'data', string.format('a table of %d entries (a table of equal-length rows)', shape[dim]),
            (type(v) == 'table' and not ffi.istype(ctype, v) and (#v .. ' entries') or E.describe(v))
            .. (dim > 1 and ' at ' .. where(path) or ''))
    end
    for i = 1, #v do
      path[dim] = i
      walk(v[i], dim + 1)
    end
    path[dim] = nil
  end
  walk(tbl, 1)
  local dtype, device = dtype_device(fn, opts, kind == 'boolean' and DT.bool or default_dtype, -1)
  -- an integer dtype takes integers it can hold, as fa_fill: the conversion would saturate 1e20, make NaN 0 and
  -- truncate 1.5 (a fraction where an integer is expected is an error here)
  local lim = INT_LIMIT[dtype]
  if lim and kind == 'number' then
    for i = 1, #flat do
      local v = flat[i]
      if not (v == floor(v) and v >= -lim and v < lim) then
        local at, r = {}, i - 1
        for d = #shape, 1, -1 do at[d] = r % shape[d] + 1; r = floor(r / shape[d]) end
        E.arg(fn, 'data', 'integers in the range of ' .. DT_NAME[dtype], E.describe(v) .. ' at ' .. where(at))
      end
    end
  end
  local x = new(shape, DT.float64, -1, fn)
  local p = ffi.cast('double*', x.desc.data)
  for i = 1, #flat do p[i - 1] = flat[i] end
  if dtype == DT.float64 and device < 0 then return x end
  return x:to(dtype, device)
end

function M.tensor(tbl, opts) return tensor('fa.tensor', tbl, opts) end

-- fa.Tensor(2, 3) (uninitialised, as torch.Tensor(2, 3)) and fa.Tensor({1, 2}) (from a table), for Torch7 habits
setmetatable(Tensor, { __call = function(_, a, ...)
  if type(a) == 'table' and not ffi.istype(ctype, a) then return tensor('fa.Tensor', a, ...) end
  return new(parse_args('fa.Tensor', a, ...))
end })

---------------------------------------------------------------------------- RNG
local rng = { seed = 0x2545F4914F6CDD1D, offset = 0 }
function M.manualSeed(seed)
  -- 0..2^64-1 (a uint64 key), so that fa.manualSeed(fa.seed()) works with the default seed too
  if type(seed) ~= 'number' or seed ~= floor(seed) or seed < 0 or seed >= 2 ^ 64 then
    E.argv('fa.manualSeed', 'seed', 'an integer in 0..2^64-1', seed)
  end
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


local function float_self(fn, x)
  if not FLOAT_DT[tonumber(x.desc.dtype)] then
    E.raise(string.format('%s: expected a floating-point tensor, got %s', fn, E.describe(x)))
  end
end

local function uniform(self, a, b, fn)
  a, b = finite(fn, 'from', a == nil and 0 or a), finite(fn, 'to', b == nil and 1 or b)
  if b < a then E.arg(fn, 'to', 'a number >= from (' .. E.describe(a) .. ')', E.describe(b)) end
  float_self(fn, self)
  check_writable(fn, self)
  local seed, off = M._rng_take(self:numel())
  check(lib.fa_uniform(self.desc, a, b, seed, off), fn, { out = 'self' })
  return self
end
local function normal(self, mean, std, fn)
  mean, std = finite(fn, 'mean', mean == nil and 0 or mean), finite(fn, 'std', std == nil and 1 or std)
  if std < 0 then E.arg(fn, 'std', 'a number >= 0', E.describe(std)) end
  float_self(fn, self)
  check_writable(fn, self)
  local seed, off = M._rng_take(self:numel())
  check(lib.fa_normal(self.desc, mean, std, seed, off), fn, { out = 'self' })
  return self
end
function Tensor:uniform(a, b) return uniform(self, a, b, 'Tensor:uniform') end
function Tensor:normal(mean, std) return normal(self, mean, std, 'Tensor:normal') end
function M.rand(...) return uniform(new(parse_args('fa.rand', ...)), 0, 1, 'fa.rand') end
function M.randn(...) return normal(new(parse_args('fa.randn', ...)), 0, 1, 'fa.randn') end
function M.rand_like(x, opts) return uniform(new(like('fa.rand_like', x, opts)), 0, 1, 'fa.rand_like') end
function M.randn_like(x, opts) return normal(new(like('fa.randn_like', x, opts)), 0, 1, 'fa.randn_like') end

---------------------------------------------------------------------------- metadata
function Tensor:dim() return self.desc.ndim end
Tensor.nDimension = Tensor.dim
function Tensor:numel()
  local n = 1
  for i = 0, self.desc.ndim - 1 do n = n * tonumber(self.desc.shape[i]) end
  return n
end
Tensor.nElement = Tensor.numel

-- a 1-based dim of self (negative counts from the end; extra = 1 allows one past the last, for unsqueeze)
local function norm_dim(self, d, fn, extra, name)
  local n = self.desc.ndim + (extra or 0)
  if type(d) == 'number' and d == floor(d) and d ~= 0 and d >= -n and d <= n then
    return d < 0 and d + n + 1 or d
  end
  E.argv(fn, name or 'dim', n == 0 and 'no dimension (the tensor is 0-D)'
         or string.format('a dimension in 1..%d or -%d..-1', n, n), d)
end
M._norm_dim = norm_dim

-- a 1-based index into dimension `dim` of size n (negative counts from the end); returns it in 1..n
local function norm_index(fn, name, v, n, dim)
  if type(v) == 'number' and v == floor(v) and v ~= 0 and v >= -n and v <= n then
    return v < 0 and v + n + 1 or v
  end
  E.argv(fn, name, n == 0 and string.format('no index (dimension %d has size 0)', dim)
         or string.format('an index in 1..%d or -%d..-1 (dimension %d has size %d)', n, n, dim, n), v)
end

-- size() returns a Lua array; size(d) one size (d may be negative: -1 is the last)
function Tensor:size(d)
  if d ~= nil then return tonumber(self.desc.shape[norm_dim(self, d, 'Tensor:size') - 1]) end
  local s = {}
  for i = 0, self.desc.ndim - 1 do s[i + 1] = tonumber(self.desc.shape[i]) end
  return s
end
function Tensor:stride(d)
  if d ~= nil then return tonumber(self.desc.stride[norm_dim(self, d, 'Tensor:stride') - 1]) end
  local s = {}
  for i = 0, self.desc.ndim - 1 do s[i + 1] = tonumber(self.desc.stride[i]) end
  return s
end
function Tensor:dtype() return DT_NAME[self.desc.dtype] end
function Tensor:device() return device_name(self.desc.device) end
-- true for float32/float64/bfloat16/float16 (PyTorch's is_floating_point); the one dtype predicate to use
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
  if not ffi.istype(ctype, o) then E.argv('Tensor:isSameSizeAs', 'other', 'a tensor', o) end
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
  if t == 'torch.CudaTensor' or t == 'fa.CudaTensor' then
    if tonumber(lib.fa_cuda_device_count()) == 0 then E.argv('Tensor:type', 'type', 'a CPU type (' .. devices_expected() .. ')', t) end
    return self:to(nil, device_id('cuda', 'Tensor:type', 'type'))
  end
  if type(t) ~= 'string' then E.argv('Tensor:type', 'type', "a type name ('fa.FloatTensor', 'torch.DoubleTensor', ...)", t) end
  return self:to(dtype_id(t, 'Tensor:type', 'type'))
end

local function convert(x, dtype, device, fn)
  if dtype == x.desc.dtype and device == x.desc.device then return x end
  local y = new(x:size(), dtype, device, fn)
  check(lib.fa_copy(y.desc, x.desc), fn, { src = 'self', dst = 'result' })
  return y
end

-- to(dtype), to(device), to(dtype, device), to({dtype=, device=}); returns self when nothing changes
function Tensor:to(a, b)
  local fn = 'Tensor:to'
  local dtype, device = self.desc.dtype, self.desc.device
  if type(a) == 'table' and not ffi.istype(ctype, a) then
    if b ~= nil then E.argv(fn, 'device', 'nothing after an options table', b) end
    dtype, device = dtype_device(fn, a, dtype, device)
  elseif type(a) == 'number' and b == nil and DT_NAME[a] == nil then -- a number that is no dtype id: a device
    device = device_id(a, fn, 'device')
  else
    if type(a) == 'string' and (a == 'cpu' or a:match('^cuda')) then -- to(device[, dtype])
      device = device_id(a, fn, 'device')
      if b ~= nil then dtype = dtype_id(b, fn, 'dtype') end
    else -- to(dtype[, device])
      if a ~= nil then dtype = dtype_id(a, fn, 'dtype') end
      if b ~= nil then device = device_id(b, fn, 'device') end
    end
  end
  return convert(self, dtype, device, fn)
end
function Tensor:cuda(dev) return convert(self, self.desc.dtype, device_id(dev == nil and 'cuda' or dev, 'Tensor:cuda', 'device'), 'Tensor:cuda') end
function Tensor:cpu() return convert(self, self.desc.dtype, -1, 'Tensor:cpu') end
function Tensor:float() return convert(self, DT.float32, self.desc.device, 'Tensor:float') end
function Tensor:double() return convert(self, DT.float64, self.desc.device, 'Tensor:double') end
function Tensor:half() return convert(self, DT.float16, self.desc.device, 'Tensor:half') end
function Tensor:bfloat16() return convert(self, DT.bfloat16, self.desc.device, 'Tensor:bfloat16') end
function Tensor:long() return convert(self, DT.int64, self.desc.device, 'Tensor:long') end
function Tensor:int() return convert(self, DT.int32, self.desc.device, 'Tensor:int') end
function Tensor:bool() return convert(self, DT.bool, self.desc.device, 'Tensor:bool') end

function Tensor:clone()
  local y = new(self:size(), self.desc.dtype, self.desc.device, 'Tensor:clone')
  check(lib.fa_copy(y.desc, self.desc), 'Tensor:clone', { src = 'self', dst = 'result' })
  return y
end
function Tensor:contiguous()
  if self:isContiguous() then return self end
  return self:clone()
end
-- copy(src): src's values into self (same number of elements; any dtype and device)
function Tensor:copy(src)
  E.tensor('Tensor:copy', 'src', src)
  check_writable('Tensor:copy', self)
  src = unaliased(self, src)
  check(lib.fa_copy(self.desc, src.desc), 'Tensor:copy', { dst = 'self' })
  return self
end
function Tensor:fill(v) return fill(self, value_arg('Tensor:fill', 'value', v), 'Tensor:fill', { dst = 'self', value = 'value' }) end
function Tensor:zero() return fill(self, 0, 'Tensor:zero') end

-- resize to a shape (a table or sizes); reallocates only when the storage is too small; contents undefined
function Tensor:resize(...)
  local fn = 'Tensor:resize'
  local shape, i = sizes_args(fn, ...)
  if select('#', ...) >= i and select(i, ...) ~= nil then E.argv(fn, 'size', 'sizes as numbers or one table', select(i, ...)) end
  local numel = check_shape(fn, 'size', shape)
  local same = #shape == self.desc.ndim
  for k = 1, #shape do same = same and self.desc.shape[k - 1] == shape[k] end
  if same and self:isContiguous() then return self end
  local need = numel * lib.fa_dtype_size(self.desc.dtype)
  local base = self.storage ~= nil and tonumber(ffi.cast('char*', self.desc.data) - ffi.cast('char*', self.storage.data)) or 0
  if self.storage == nil or tonumber(self.storage.nbytes) - base < need then
    local y = new(shape, self.desc.dtype, self.desc.device, fn)
    lib.fa_storage_release(self.storage)
    self.storage = y.storage
    lib.fa_storage_retain(y.storage)
    self.desc.data = y.desc.data
  end
  set_desc(self.desc, shape, nil, fn)
  return self
end
function Tensor:resizeAs(o) E.tensor('Tensor:resizeAs', 'other', o); return self:resize(o:size()) end

---------------------------------------------------------------------------- views
-- sizes as numbers, one table or a tensor, and nothing else
local function sizes_only(fn, name, ...)
  local shape, i = sizes_args(fn, ...)
  for j = i, select('#', ...) do
    local v = select(j, ...)
    if v ~= nil then E.argv(fn, name, 'sizes as numbers, one table of numbers or a tensor', v) end
  end
  return shape
end

-- view(sizes): same storage, new shape; one size may be -1. Needs a contiguous tensor.
local function view(self, fn, shape)
  if #shape > MAX_DIMS then E.arg(fn, 'size', 'at most ' .. MAX_DIMS .. ' dimensions', #shape .. ' (size ' .. shape_text(shape) .. ')') end
  local n, infer = 1, nil
  for i, s in ipairs(shape) do
    if type(s) ~= 'number' or s ~= floor(s) or s < -1 or s >= MAX_NUMEL then
      E.argv(fn, 'size', 'a non-negative integer size (or -1) in dimension ' .. i, s)
    end
    if s == -1 then
      if infer then E.arg(fn, 'size', 'at most one size -1', shape_text(shape)) end
      infer = i
    else n = n * s end
  end
  local numel = self:numel()
  if infer then
    if n == 0 or numel % n ~= 0 then
      E.arg(fn, 'size', string.format('a size whose -1 can be inferred for %d elements', numel), shape_text(shape))
    end
    shape[infer] = numel / n
    n = numel
  end
  if n ~= numel then
    E.arg(fn, 'size', string.format('%d elements (the size of %s)', numel, shape_str(self, 'x')),
          string.format('%s (%.17g elements)', shape_text(shape), n))
  end
  if not self:isContiguous() then
    E.raise(fn .. ': the tensor of size ' .. shape_str(self, 'x') .. ' is not contiguous; call :contiguous() or use :reshape()')
  end
  local y = view_of(self)
  set_desc(y.desc, shape, nil, fn)
  return y
end
function Tensor:view(...) return view(self, 'Tensor:view', sizes_only('Tensor:view', 'size', ...)) end
function Tensor:reshape(...)
  local shape = sizes_only('Tensor:reshape', 'size', ...)
  if self:isContiguous() then return view(self, 'Tensor:reshape', shape) end
  return view(self:clone(), 'Tensor:reshape', shape)
end
function Tensor:viewAs(o) E.tensor('Tensor:viewAs', 'other', o); return view(self, 'Tensor:viewAs', o:size()) end
function Tensor:flatten() return self:reshape(self:numel()) end

-- narrow(dim, start, length): 1-based start (negative counts from the end); length 0 allowed
function Tensor:narrow(dim, start, len)
  local fn = 'Tensor:narrow'
  dim = norm_dim(self, dim, fn)
  local shape, stride = dims(self)
  local n = shape[dim]
  if not (type(start) == 'number' and start == floor(start) and start >= -n and start <= n + 1 and start ~= 0) then
    E.argv(fn, 'start', string.format('an integer in 1..%d or -%d..-1 (dimension %d has size %d)', n + 1, n, dim, n), start)
  end
  if start < 0 then start = start + n + 1 end
  E.integer(fn, 'length', len, 0, n - start + 1)
  local y = view_of(self)
  shape[dim] = len
  set_desc(y.desc, shape, stride, fn)
  y.desc.data = ffi.cast('char*', self.desc.data) + (start - 1) * stride[dim] * lib.fa_dtype_size(self.desc.dtype)
  return y
end

-- select(dim, index): removes dim
local function select_(self, fn, dim, idx, name)
  dim = norm_dim(self, dim, fn)
  local shape, stride = dims(self)
  idx = norm_index(fn, name or 'index', idx, shape[dim], dim)
  local st = stride[dim]
  table.remove(shape, dim)
  table.remove(stride, dim)
  local y = view_of(self)
  set_desc(y.desc, shape, stride, fn)
  y.desc.data = ffi.cast('char*', self.desc.data) + (idx - 1) * st * lib.fa_dtype_size(self.desc.dtype)
  return y
end
function Tensor:select(dim, idx) return select_(self, 'Tensor:select', dim, idx) end

function Tensor:transpose(a, b)
  local fn = 'Tensor:transpose'
  a, b = norm_dim(self, a, fn, 0, 'dim0'), norm_dim(self, b, fn, 0, 'dim1')
  local shape, stride = dims(self)
  shape[a], shape[b] = shape[b], shape[a]
  stride[a], stride[b] = stride[b], stride[a]
  local y = view_of(self)
  set_desc(y.desc, shape, stride, fn)
  return y
end
function Tensor:t()
  if self.desc.ndim ~= 2 then E.raise('Tensor:t: expected a 2-D tensor, got ' .. E.describe(self)) end
  return self:transpose(1, 2)
end

function Tensor:permute(...)
  local fn = 'Tensor:permute'
  local p = sizes_only(fn, 'dims', ...)
  local nd = self.desc.ndim
  if #p ~= nd then E.arg(fn, 'dims', string.format('%d dimensions (a permutation of 1..%d)', nd, nd), #p .. '') end
  local shape, stride = dims(self)
  local ns, nst, seen = {}, {}, {}
  for i = 1, #p do
    local s = norm_dim(self, p[i], fn, 0, 'dims')
    if seen[s] then E.arg(fn, 'dims', 'a permutation of 1..' .. nd, 'dimension ' .. s .. ' twice') end
    seen[s] = true
    ns[i], nst[i] = shape[s], stride[s]
  end
  local y = view_of(self)
  set_desc(y.desc, ns, nst, fn)
  return y
end

function Tensor:unsqueeze(dim)
  local fn = 'Tensor:unsqueeze'
  dim = norm_dim(self, dim, fn, 1)
  if self.desc.ndim >= MAX_DIMS then
    E.raise(string.format('%s: expected a tensor of at most %d dimensions (the result may have %d), got %s', fn,
                          MAX_DIMS - 1, MAX_DIMS, E.describe(self)))
  end
  local shape, stride = dims(self)
  local st = dim <= #shape and shape[dim] * stride[dim] or 1
  table.insert(shape, dim, 1)
  table.insert(stride, dim, st)
  local y = view_of(self)
  set_desc(y.desc, shape, stride, fn)
  return y
end

-- squeeze() drops every size-1 dim; squeeze(dim) that one (if its size is 1)
function Tensor:squeeze(dim)
  if dim ~= nil then dim = norm_dim(self, dim, 'Tensor:squeeze') end
  local shape, stride = dims(self)
  local ns, nst = {}, {}
  for i = 1, #shape do
    if not (shape[i] == 1 and (dim == nil or dim == i)) then
      ns[#ns + 1], nst[#nst + 1] = shape[i], stride[i]
    end
  end
  local y = view_of(self)
  set_desc(y.desc, ns, nst, 'Tensor:squeeze')
  return y
end

-- expand(sizes): size-1 dims broadcast with stride 0 (-1 keeps a size); new leading dims allowed
local function expand(self, fn, want)
  local nd, od = #want, self.desc.ndim
  if nd > MAX_DIMS then E.arg(fn, 'size', 'at most ' .. MAX_DIMS .. ' dimensions', nd .. ' (size ' .. shape_text(want) .. ')') end
  if nd < od then
    E.arg(fn, 'size', string.format('at least %d sizes (the tensor has size %s)', od, shape_str(self, 'x')), shape_text(want))
  end
  local shape, stride = dims(self)
  local ns, nst = {}, {}
  for i = 1, nd do
    local w = want[i]
    local j = i - (nd - od)
    if type(w) ~= 'number' or w ~= floor(w) or w < (j >= 1 and -1 or 0) or w >= MAX_NUMEL then
      E.argv(fn, 'size', string.format('a non-negative integer%s in dimension %d', j >= 1 and ' (or -1)' or '', i), w)
    end
    if j >= 1 then
      local have = shape[j]
      if w == -1 then w = have end
      if have == w then ns[i], nst[i] = have, stride[j]
      elseif have == 1 then ns[i], nst[i] = w, 0
      else
        E.arg(fn, 'size', string.format('size %d or -1 in dimension %d (the tensor has size %s there)', have, i, have), E.describe(w))
      end
    else
      ns[i], nst[i] = w, 0
    end
  end
  local y = view_of(self)
  set_desc(y.desc, ns, nst, fn)
  return y
end
function Tensor:expand(...) return expand(self, 'Tensor:expand', sizes_only('Tensor:expand', 'size', ...)) end
function Tensor:expandAs(o) E.tensor('Tensor:expandAs', 'other', o); return expand(self, 'Tensor:expandAs', o:size()) end

---------------------------------------------------------------------------- element access
-- element offset of the indices (one per dimension, 1-based, negative from the end)
local function elem_offset(self, fn, idx)
  local nd = self.desc.ndim
  if #idx ~= nd then
    E.arg(fn, 'index', string.format('%d indices (one per dimension)', nd), #idx .. '')
  end
  local off = 0
  for i = 1, nd do
    local v = norm_index(fn, 'index', idx[i], tonumber(self.desc.shape[i - 1]), i)
    off = off + (v - 1) * tonumber(self.desc.stride[i - 1])
  end
  return off
end

-- Element readers for CPU memory. LuaJIT 2.1.0-beta3 (Debian's luajit) does not canonicalise NaNs loaded through the
-- FFI: a NaN with the sign bit and payload bits set (uninitialised memory, a file, a bfloat16 0xFFFF widened) comes out
-- as nil or as a bogus object pointer, which crashes the collector. Every such bit pattern is a NaN, so the readers
-- check the raw bits first and return the canonical NaN for them.
local HI = ffi.abi('le') and 1 or 0
local NAN = 0 / 0
local u32ptr = ffi.typeof('const uint32_t*')
-- reader(x)(off): element off (in elements from x's data) of the CPU tensor x, as a Lua number
local function reader(x)
  local dt = tonumber(x.desc.dtype)
  local p = ffi.cast(DT_PTR[dt], x.desc.data)
  if dt == DT.float64 then
    local w = ffi.cast(u32ptr, x.desc.data)
    return function(off)
      if w[2 * off + HI] >= 0xFFF80000 then return NAN end
      return p[off]
    end
  elseif dt == DT.float32 then
    local w = ffi.cast(u32ptr, x.desc.data)
    return function(off)
      if w[off] > 0xFF800000 then return NAN end
      return p[off]
    end
  end
  return function(off) return tonumber(p[off]) end
end
M._reader = reader

-- a 0-D view of the element at off
local function element(self, off, fn)
  local y = view_of(self)
  set_desc(y.desc, {}, {}, fn)
  y.desc.data = ffi.cast('char*', self.desc.data) + off * lib.fa_dtype_size(self.desc.dtype)
  return y
end

-- one element read back as a number (a boolean for bool tensors)
local function read_one(self, off, fn)
  local dt = tonumber(self.desc.dtype)
  local v
  if self.desc.device < 0 and dt ~= DT.bfloat16 and dt ~= DT.float16 then
    v = reader(self)(off)
  else
    local dst = new({}, dt == DT.int64 and DT.int64 or DT.float64, -1, fn)
    check(lib.fa_copy(dst.desc, element(self, off, fn).desc), fn, { src = 'self' })
    v = reader(dst)(0)
  end
  return v
end

local function get(self, fn, ...) return read_one(self, elem_offset(self, fn, { ... }), fn) end
local function set(self, fn, idx, v)
  v = value_arg(fn, 'value', v)
  local off = elem_offset(self, fn, idx)
  fill(element(self, off, fn), v, fn, { dst = 'self' })
  return self
end
function Tensor:get(...) return get(self, 'Tensor:get', ...) end
function Tensor:set(...)
  local n = select('#', ...)
  local idx = { ... }
  local v = idx[n]
  idx[n] = nil
  return set(self, 'Tensor:set', idx, v)
end
-- item(): the value of a 1-element tensor
function Tensor:item()
  if self:numel() ~= 1 then E.raise('Tensor:item: expected a 1-element tensor, got ' .. E.describe(self)) end
  return read_one(self, 0, 'Tensor:item')
end

-- table(): nested Lua tables (a number for a 0-D tensor; booleans for a bool tensor)
function Tensor:table()
  local x = self
  if x.desc.device >= 0 or x.desc.dtype == DT.bfloat16 or x.desc.dtype == DT.float16 then
    x = convert(x, x.desc.dtype == DT.int64 and DT.int64 or (x.desc.dtype == DT.int32 and DT.int32 or
                (x.desc.dtype == DT.bool and DT.bool or DT.float64)), -1, 'Tensor:table')
  end
  local read = reader(x)
  local isbool = x.desc.dtype == DT.bool
  local function rec(dim, off)
    if dim == x.desc.ndim then
      local v = read(off)
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
local function nonfinite(v)
  if v ~= v then return 'nan' end
  if v == huge then return 'inf' end
  if v == -huge then return '-inf' end
end

-- one format for every value shown (Torch/PyTorch): integer-valued floats without decimals; scientific
-- notation when the finite non-zero magnitudes span more than 1000x, or reach 1e8, or go below 1e-4 (where
-- %.4f would show 1e-8 as 0.0000); %.4f otherwise
local function float_format(vals)
  local maxabs, minabs, allint = 0, huge, true
  for _, v in ipairs(vals) do
    if not nonfinite(v) then
      local a = math.abs(v)
      if a > maxabs then maxabs = a end
      if a > 0 and a < minabs then minabs = a end
      if v ~= floor(v) then allint = false end
    end
  end
  local fmt
  if allint and maxabs < 1e8 then fmt = '%.0f'
  elseif maxabs > 0 and (maxabs >= 1e8 or minabs < 1e-4 or maxabs / minabs > 1000) then fmt = '%.4e'
  else fmt = '%.4f' end
  return function(v) return nonfinite(v) or string.format(fmt, v) end
end

function Tensor:__tostring()
  local dt = tonumber(self.desc.dtype)
  local header = string.format('[%s of size %s%s]', DT_TYPE[dt], shape_str(self, 'x'),
                               self.desc.device >= 0 and (' (' .. device_name(self.desc.device) .. ')') or '')
  local n = self:numel()
  if n == 0 then return header end
  -- a CPU copy that Lua reads exactly: int64 and int32 and bool as they are, floats as float64
  local x = convert(self, (dt == DT.int64 or dt == DT.int32 or dt == DT.bool) and dt or DT.float64, -1, 'Tensor:__tostring')
  local p = ffi.cast(DT_PTR[tonumber(x.desc.dtype)], x.desc.data)
  local read
  if dt == DT.bool then read = function(off) return p[off] ~= 0 and 'true' or 'false' end
  elseif dt == DT.int64 then read = function(off) return (tostring(p[off]):gsub('LL$', '')) end
  elseif dt == DT.int32 then read = function(off) return string.format('%d', p[off]) end
  else read = reader(x) end
  local summarise = n > 1000
  local edge = 3
  local function indices(size)
    local r = {}
    if summarise and size > 2 * edge then
      for i = 0, edge - 1 do r[#r + 1] = i end
      r[#r + 1] = false
      for i = size - edge, size - 1 do r[#r + 1] = i end
      return r
    end
    for i = 0, size - 1 do r[#r + 1] = i end
    return r
  end
  local nd = x.desc.ndim
  -- the values shown, for one common format and width
  local shown = {}
  local function collect(dim, off)
    if dim == nd then shown[#shown + 1] = read(off); return end
    for _, i in ipairs(indices(tonumber(x.desc.shape[dim]))) do
      if i then collect(dim + 1, off + i * tonumber(x.desc.stride[dim])) end
    end
  end
  collect(0, 0)
  local f = type(shown[1]) == 'string' and function(v) return v end or float_format(shown)
  local width = 0
  for _, v in ipairs(shown) do width = math.max(width, #f(v)) end
  local function cell(off)
    local s = f(read(off))
    return string.rep(' ', width - #s) .. s
  end
  local lines = {}
  local function row(off)
    local parts = {}
    local last = nd - 1
    for _, i in ipairs(indices(tonumber(x.desc.shape[last]))) do
      parts[#parts + 1] = i and cell(off + i * tonumber(x.desc.stride[last])) or '...'
    end
    return ' ' .. table.concat(parts, ' ')
  end
  if nd == 0 then
    lines[1] = ' ' .. cell(0)
  elseif nd == 1 then
    for _, i in ipairs(indices(tonumber(x.desc.shape[0]))) do
      lines[#lines + 1] = i and (' ' .. cell(i * tonumber(x.desc.stride[0]))) or (' ' .. string.rep(' ', width - 3) .. '...')
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
  -- x[i]: the element of a 1-D tensor, the i-th slice along dim 1 otherwise (1-based, negative from the end)
  __index = function(self, k)
    local m = methods[k]
    if m ~= nil then return m end
    if type(k) == 'number' then
      local fn = 'Tensor:__index'
      if self.desc.ndim == 0 then E.argv(fn, 'index', 'no index (the tensor is 0-D; use :item())', k) end
      if self.desc.ndim == 1 then return get(self, fn, k) end
      return select_(self, fn, 1, k)
    end
    -- x:fro() for x:foo(): a message instead of Lua's "attempt to call method 'fro' (a nil value)"
    E.raise(string.format('fa.Tensor: no method or field %s (an index is a number: x[i])', E.describe(k)))
  end,
  -- x[i] = v: v a number (fills the slice) or a tensor (copied into it)
  __newindex = function(self, k, v)
    local fn = 'Tensor:__newindex'
    if type(k) ~= 'number' then E.argv(fn, 'index', 'an integer index (tensors take no fields)', k) end
    if self.desc.ndim == 0 then E.argv(fn, 'index', 'no index (the tensor is 0-D; use :fill())', k) end
    if self.desc.ndim == 1 then set(self, fn, { k }, v); return end
    local s = select_(self, fn, 1, k)
    if ffi.istype(ctype, v) then check(lib.fa_copy(s.desc, v.desc), fn, { dst = 'index', src = 'value' })
    else fill(s, value_arg(fn, 'value', v), fn, { dst = 'self' }) end
  end,
  __len = function(self) return self.desc.ndim > 0 and tonumber(self.desc.shape[0]) or 0 end,
}
-- operators a tensor does not have: a message instead of the FFI's "attempt to compare 'struct fa_Tensor'"
local NO_OP = { __lt = "'<'", __le = "'<='", __mod = "'%'", __pow = "'^'", __concat = "'..'", __call = 'a call' }
local NO_OP_HINT = { __lt = ' (compare values with :item(), :equal() or fa.allclose)',
                     __le = ' (compare values with :item(), :equal() or fa.allclose)',
                     __concat = ' (use tostring(x))', __call = ' (modules are called, tensors are not)' }
for k, what in pairs(NO_OP) do
  mt[k] = function() E.raise('fa.Tensor: ' .. what .. ' is not defined for tensors' .. (NO_OP_HINT[k] or '')) end
end
M._mt = mt
ctype = ffi.metatype('fa_Tensor', mt)
M._ctype = ctype

function M.isTensor(x) return ffi.istype(ctype, x) end
E.isTensor = M.isTensor

registry.fastattn_tensor = M
return M

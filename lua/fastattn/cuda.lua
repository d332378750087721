-- fastattn.cuda (fa.cuda): devices, synchronisation, memory statistics of the caching allocator, TF32,
-- and CUDA events for timing.
--
-- Device indices are 0-based, as CUDA's and PyTorch's ('cuda:0' is device 0), not 1-based like Lua
-- dims: fa.cuda.setDevice(0) selects the first GPU.
--
-- Every fastattn kernel of a device runs on that device's one stream, in call order; no op synchronises
-- the device except copies to the host (which must wait for the data). Time GPU work with events or call
-- fa.cuda.synchronize() before reading a host clock.
local ffi = require 'ffi'
local lib = require 'fastattn.ffi'
local E = require 'fastattn.errors'

local M = {}
local check = E.check

-- true when the library has its CUDA kernels and at least one GPU is visible
function M.isAvailable()
  return lib.fa_has_cuda() ~= 0 and lib.fa_cuda_device_count() > 0
end

function M.deviceCount() return tonumber(lib.fa_cuda_device_count()) end

-- the device 'cuda' (no index) means; 0-based
function M.getDevice() return tonumber(lib.fa_cuda_get_device()) end
-- a CUDA device: nil (the current one), a 0-based index, 'cuda' or 'cuda:N'; it must exist
local function dev_arg(fn, d, name)
  local n = tonumber(lib.fa_cuda_device_count())
  local i
  if d == nil or d == 'cuda' then i = tonumber(lib.fa_cuda_get_device())
  elseif type(d) == 'number' then i = d
  elseif type(d) == 'string' then i = tonumber(d:match('^cuda:(%d+)$')) end
  if type(i) == 'number' and i == math.floor(i) and i >= 0 and i < n then return i end
  local expected = n == 0 and 'a CUDA device (' .. (lib.fa_has_cuda() ~= 0 and 'none is visible'
                                                    or 'this fastattn was built without CUDA') .. ')'
                   or string.format("a CUDA device index in 0..%d, 'cuda' or 'cuda:N'", n - 1)
  E.argv(fn, name or 'device', expected, d)
end

function M.setDevice(i)
  local fn = 'fa.cuda.setDevice'
  if i == nil then E.argv(fn, 'device', 'a 0-based CUDA device index', i) end
  check(lib.fa_cuda_set_device(dev_arg(fn, i)), fn)
end

-- waits for all work queued on the device (the current one by default)
function M.synchronize(d) check(lib.fa_cuda_synchronize(dev_arg('fa.cuda.synchronize', d)), 'fa.cuda.synchronize') end

local stats = ffi.new('int64_t[4]')
-- {allocated = bytes in tensors, cached = bytes held free by the allocator, peak = peak of allocated,
--  reserved = allocated + cached (what the process holds on the GPU)}
function M.memoryStats(d)
  check(lib.fa_cuda_memory_stats(dev_arg('fa.cuda.memoryStats', d), stats), 'fa.cuda.memoryStats')
  local a, c = tonumber(stats[0]), tonumber(stats[1])
  return { allocated = a, cached = c, peak = tonumber(stats[2]), reserved = a + c, sinceGC = tonumber(stats[3]) }
end
function M.memoryAllocated(d)
  local fn = 'fa.cuda.memoryAllocated'
  check(lib.fa_cuda_memory_stats(dev_arg(fn, d), stats), fn)
  return tonumber(stats[0])
end
function M.resetPeakStats(d)
  check(lib.fa_cuda_reset_peak_stats(dev_arg('fa.cuda.resetPeakStats', d)), 'fa.cuda.resetPeakStats')
end
-- returns the allocator's free blocks to the driver (after a collection, so that dead tensors count)
function M.emptyCache(d)
  local dev = dev_arg('fa.cuda.emptyCache', d)
  collectgarbage('collect')
  check(lib.fa_cuda_empty_cache(dev), 'fa.cuda.emptyCache')
end

-- TF32 tensor cores for float32 matrix products (off by default: float32 products stay float32-exact)
local tf32 = false
function M.allowTF32(on)
  E.boolean('fa.cuda.allowTF32', 'on', on)
  check(lib.fa_cuda_allow_tf32(on and 1 or 0), 'fa.cuda.allowTF32')
  tf32 = on
end
function M.isTF32Allowed() return tf32 end

function M.deviceName(d)
  local buf = ffi.new('char[256]')
  check(lib.fa_cuda_device_name(dev_arg('fa.cuda.deviceName', d), buf, 256), 'fa.cuda.deviceName')
  return ffi.string(buf)
end

---------------------------------------------------------------------------- events
-- local e0, e1 = fa.cuda.Event(), fa.cuda.Event(); e0:record(); ...; e1:record(); e1:synchronize()
-- print(e0:elapsedTime(e1)) -- milliseconds
local Event = {}
Event.__index = Event

local function destroy(box) lib.fa_cuda_event_destroy(box[0]) end

function M.Event()
  local box = ffi.new('void*[1]')
  check(lib.fa_cuda_event_create(box), 'fa.cuda.Event')
  return setmetatable({ handle = ffi.gc(box, destroy) }, Event)
end
-- records the event on the stream of device d (default: the current device), after the work queued so far
local function event_arg(fn, name, e)
  if getmetatable(e) ~= Event then E.argv(fn, name, 'a fa.cuda.Event', e) end
  return e
end
function Event:record(d)
  local fn = 'fa.cuda.Event:record'
  event_arg(fn, 'self', self)
  check(lib.fa_cuda_event_record(self.handle[0], dev_arg(fn, d)), fn)
  return self
end
function Event:synchronize()
  local fn = 'fa.cuda.Event:synchronize'
  event_arg(fn, 'self', self)
  check(lib.fa_cuda_event_synchronize(self.handle[0]), fn)
  return self
end
-- milliseconds from self to other (both recorded; waits for other)
function Event:elapsedTime(other)
  local fn = 'fa.cuda.Event:elapsedTime'
  event_arg(fn, 'self', self)
  event_arg(fn, 'other', other)
  check(lib.fa_cuda_event_synchronize(other.handle[0]), fn, { event = 'other' })
  local ms = ffi.new('float[1]')
  check(lib.fa_cuda_event_elapsed(ms, self.handle[0], other.handle[0]), fn, { start = 'self', ['end'] = 'other' })
  return tonumber(ms[0])
end
M.EventClass = Event

-- fa.cuda.time(fn, reps, warmup): median milliseconds of one call of fn over reps timed calls (each between
-- two events), after warmup untimed calls. Returns median, min, and the table of times.
function M.time(fn, reps, warmup)
  if type(fn) ~= 'function' then E.argv('fa.cuda.time', 'fn', 'a function', fn) end
  reps = E.integer('fa.cuda.time', 'reps', reps, 1, nil, true) or 10
  warmup = E.integer('fa.cuda.time', 'warmup', warmup, 0, nil, true) or 2
  for _ = 1, warmup do fn() end
  local e = {}
  for i = 1, reps + 1 do e[i] = M.Event() end
  e[1]:record()
  for i = 1, reps do
    fn()
    e[i + 1]:record()
  end
  e[reps + 1]:synchronize()
  local t = {}
  for i = 1, reps do t[i] = e[i]:elapsedTime(e[i + 1]) end
  local s = { unpack(t) }
  table.sort(s)
  return s[math.floor((reps + 1) / 2)], s[1], t
end

return M

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

local M = {}

local function check(rc, level)
  if rc ~= 0 then error(ffi.string(lib.fa_last_error()), (level or 1) + 1) end
end

-- true when the library has its CUDA kernels and at least one GPU is visible
function M.isAvailable()
  return lib.fa_has_cuda() ~= 0 and lib.fa_cuda_device_count() > 0
end

function M.deviceCount() return tonumber(lib.fa_cuda_device_count()) end

-- the device 'cuda' (no index) means; 0-based
function M.getDevice() return tonumber(lib.fa_cuda_get_device()) end
function M.setDevice(i)
  if type(i) ~= 'number' or i ~= math.floor(i) then
    error('fa.cuda.setDevice: expected a 0-based device index, got ' .. tostring(i), 2)
  end
  check(lib.fa_cuda_set_device(i), 2)
end

local function dev_arg(fn, d)
  if d == nil then
    local cur = tonumber(lib.fa_cuda_get_device())
    if cur < 0 then error(fn .. ': no CUDA device available', 3) end
    return cur
  end
  if type(d) == 'string' then
    local i = d == 'cuda' and tonumber(lib.fa_cuda_get_device()) or tonumber(d:match('^cuda:(%d+)$'))
    if not i then error(fn .. ": expected a device index or 'cuda:N', got " .. d, 3) end
    return i
  end
  if type(d) ~= 'number' then error(fn .. ': expected a 0-based device index, got ' .. type(d), 3) end
  return d
end

-- waits for all work queued on the device (the current one by default)
function M.synchronize(d) check(lib.fa_cuda_synchronize(dev_arg('fa.cuda.synchronize', d)), 2) end

local stats = ffi.new('int64_t[4]')
-- {allocated = bytes in tensors, cached = bytes held free by the allocator, peak = peak of allocated,
--  reserved = allocated + cached (what the process holds on the GPU)}
function M.memoryStats(d)
  check(lib.fa_cuda_memory_stats(dev_arg('fa.cuda.memoryStats', d), stats), 2)
  local a, c = tonumber(stats[0]), tonumber(stats[1])
  return { allocated = a, cached = c, peak = tonumber(stats[2]), reserved = a + c, sinceGC = tonumber(stats[3]) }
end
function M.memoryAllocated(d) return M.memoryStats(d).allocated end
function M.resetPeakStats(d) check(lib.fa_cuda_reset_peak_stats(dev_arg('fa.cuda.resetPeakStats', d)), 2) end
-- returns the allocator's free blocks to the driver (after a collection, so that dead tensors count)
function M.emptyCache(d)
  collectgarbage('collect')
  check(lib.fa_cuda_empty_cache(dev_arg('fa.cuda.emptyCache', d)), 2)
end

-- TF32 tensor cores for float32 matrix products (off by default: float32 products stay float32-exact)
local tf32 = false
function M.allowTF32(on)
  tf32 = on and true or false
  check(lib.fa_cuda_allow_tf32(tf32 and 1 or 0), 2)
end
function M.isTF32Allowed() return tf32 end

function M.deviceName(d)
  local buf = ffi.new('char[256]')
  check(lib.fa_cuda_device_name(dev_arg('fa.cuda.deviceName', d), buf, 256), 2)
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
  check(lib.fa_cuda_event_create(box), 2)
  return setmetatable({ handle = ffi.gc(box, destroy) }, Event)
end
-- records the event on the stream of device d (default: the current device), after the work queued so far
function Event:record(d)
  check(lib.fa_cuda_event_record(self.handle[0], dev_arg('Event:record', d)), 2)
  return self
end
function Event:synchronize()
  check(lib.fa_cuda_event_synchronize(self.handle[0]), 2)
  return self
end
-- milliseconds from self to other (both recorded; waits for other)
function Event:elapsedTime(other)
  lib.fa_cuda_event_synchronize(other.handle[0])
  local ms = ffi.new('float[1]')
  check(lib.fa_cuda_event_elapsed(ms, self.handle[0], other.handle[0]), 2)
  return tonumber(ms[0])
end
M.EventClass = Event

-- fa.cuda.time(fn, reps, warmup): median milliseconds of one call of fn over reps timed calls (each between
-- two events), after warmup untimed calls. Returns median, min, and the table of times.
function M.time(fn, reps, warmup)
  reps, warmup = reps or 10, warmup or 2
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

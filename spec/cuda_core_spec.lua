-- The CUDA backend, part 1 (cuda/runtime.cu, copy.cu, random.cu, elementwise.cu, reduce.cu, matmul.cu,
-- optim.cu; lua/fastattn/cuda.lua): every op against the CPU implementation on random inputs of awkward
-- sizes (1, odd, prime, and 3x1000003 for many blocks), every dtype, non-contiguous views; copies both
-- ways; the RNG against the CPU's numbers; the caching allocator in a 2000-step loop; device errors.
--
-- References: the CPU kernels (tested against PyTorch in their own specs). 16-bit dtypes are checked
-- against the CPU's float32 result on the same (16-bit-representable) inputs, rounded to 16 bits: ops that
-- the GPU evaluates with the CPU's exact float32 operations (add, sub, mul, div, scale, addcmul, the
-- optimiser steps, casts) must then agree bit for bit; transcendental functions (CUDA's expf/tanhf/erff
-- against glibc's) within a few float32 ulps, or one 16-bit ulp after rounding.
--
-- Every test is tagged #gpu and is pending (with a message) where no GPU is visible.
local fa = require 'fastattn'
local H = require 'helpers.check'
local ffi = require 'ffi'
local C = fa.C

local git = require('helpers.op').it_gpu -- an it() that is pending where no GPU is found

local OP = { add = 0, sub = 1, mul = 2, div = 3 }
local UNARY = { exp = 0, log = 1, sqrt = 2, abs = 3, sign = 4, neg = 5, relu = 6, tanh = 7, sigmoid = 8, gelu = 9 }
local UNARY_NAMES = { 'exp', 'log', 'sqrt', 'abs', 'sign', 'neg', 'relu', 'tanh', 'sigmoid', 'gelu' }
local EXACT_UNARY = { abs = true, sign = true, neg = true, relu = true, sqrt = true }
local POSITIVE = { log = true, sqrt = true }
local RED = { sum = 0, mean = 1, max = 2, argmax = 3 }
local FLOATS = { 'float32', 'bfloat16', 'float16' }
-- one 16-bit ulp, relative (values are normal numbers away from zero)
local ULP16 = { bfloat16 = 2 ^ -7, float16 = 2 ^ -10 }
local BIG = { 3, 1000003 }
local SHAPES = { { 1 }, { 1009 }, { 17, 31 }, { 2, 3, 5, 7 } }

local function shape_name(s) return table.concat(s, 'x') end
local function cuda(x) return x:cuda() end

-- a CPU float32 tensor whose values are representable in dt (what a dt tensor on the GPU holds)
local function q(x, dt)
  if dt == 'float32' then return x end
  return x:to(dt):float()
end
-- the CPU float32 result rounded to dt, as a float32 tensor
local function ref(y, dt) return q(y, dt) end
-- x (CPU float32, dt-representable) on the GPU as dt
local function up(x, dt) return x:to(dt, 'cuda') end

local function exact(a, b, what)
  assert(a:isSameSizeAs(b), what .. ': shapes differ')
  if not fa.allclose(a, b, 0, 0) then
    error(string.format('%s: not bit-identical, max |difference| %.3e', what, fa.maxAbsDiff(a, b)), 2)
  end
end

-- fa.C.<name>(...) with tensors passed as their descriptors. The tensors stay referenced (as arguments)
-- for the whole call: a `t:view(...).desc` argument would not keep the temporary view alive.
local function cc(name, ...)
  local n, args = select('#', ...), { ... }
  for i = 1, n do
    if fa.isTensor(args[i]) then args[i] = args[i].desc end
  end
  return C[name](unpack(args, 1, n))
end

-- calls fa.C.<name>(...) (as cc) and returns the error message (asserting that it failed)
local function c_error(name, ...)
  local rc = cc(name, ...)
  assert.are_not.equal(0, rc, name .. ' should have failed')
  return ffi.string(C.fa_last_error())
end

-- argument checks of fa.cuda: no GPU needed (they run before any CUDA call), so not tagged #gpu
describe('fa.cuda arguments', function()
  local function raises(pattern, f)
    local ok, err = pcall(f)
    assert.is_false(ok)
    assert.matches('^spec/cuda_core_spec.lua:%d+: ' .. pattern, tostring(err))
  end
  local n = fa.cuda.deviceCount()
  it('refuse devices that are not integers of a visible GPU', function()
    raises("fa.cuda.setDevice: argument 'device': expected a 0%-based CUDA device index, got nil$", function() fa.cuda.setDevice() end)
    raises("fa.cuda.setDevice: argument 'device': expected a CUDA device.*, got \"x\"$", function() fa.cuda.setDevice('x') end)
    raises("fa.cuda.setDevice: argument 'device': expected a CUDA device.*, got 0.5$", function() fa.cuda.setDevice(0.5) end)
    raises("fa.cuda.setDevice: argument 'device': expected a CUDA device.*, got %-1$", function() fa.cuda.setDevice(-1) end)
    raises("fa.cuda.synchronize: argument 'device': expected a CUDA device.*, got \"cuda:" .. n .. "\"$",
           function() fa.cuda.synchronize('cuda:' .. n) end)
    raises("fa.cuda.memoryStats: argument 'device': expected a CUDA device.*, got " .. n .. "$", function() fa.cuda.memoryStats(n) end)
    raises("fa.cuda.deviceName: argument 'device': expected a CUDA device.*, got true$", function() fa.cuda.deviceName(true) end)
    if n == 0 then
      raises("fa.cuda.synchronize: argument 'device': expected a CUDA device %(.+%), got nil$", function() fa.cuda.synchronize() end)
    end
  end)
  it('refuse options of the wrong type', function()
    raises("fa.cuda.allowTF32: argument 'on': expected true or false, got 1$", function() fa.cuda.allowTF32(1) end)
    assert.is_false(fa.cuda.isTF32Allowed())
    raises("fa.cuda.time: argument 'fn': expected a function, got \"x\"$", function() fa.cuda.time('x') end)
    raises("fa.cuda.time: argument 'reps': expected an integer >= 1, got 0$", function() fa.cuda.time(function() end, 0) end)
    raises("fa.cuda.time: argument 'warmup': expected an integer >= 0, got 1.5$", function() fa.cuda.time(function() end, 1, 1.5) end)
    raises("fa.cuda.Event:record: argument 'self': expected a fa.cuda.Event, got 5$", function() fa.cuda.EventClass.record(5) end)
  end)
end)

describe('fa.cuda runtime #gpu', function()
  git('reports devices, names, synchronises, and takes TF32 on and off', function()
    assert.is_true(fa.cuda.deviceCount() >= 1)
    assert.are.equal(1, C.fa_has_cuda())
    fa.cuda.setDevice(0)
    assert.are.equal(0, fa.cuda.getDevice())
    local name = fa.cuda.deviceName(0)
    assert.is_true(type(name) == 'string' and #name > 0)
    fa.cuda.synchronize()
    fa.cuda.allowTF32(true)
    assert.is_true(fa.cuda.isTF32Allowed())
    fa.cuda.allowTF32(false)
    assert.is_false(fa.cuda.isTF32Allowed())
    local ok, err = pcall(fa.cuda.setDevice, fa.cuda.deviceCount() + 5)
    assert.is_false(ok)
    assert.matches("fa.cuda.setDevice: argument 'device'", err, 1, true)
  end)

  git('times work with events', function()
    local x = fa.randn(1000, 1000, { device = 'cuda' })
    local e0, e1 = fa.cuda.Event(), fa.cuda.Event()
    fa.cuda.synchronize()
    local t0 = fa.clock()
    e0:record()
    for _ = 1, 5 do x = x:matmul(x):scale_(1e-3) end
    e1:record()
    e1:synchronize()
    local wall_ms = (fa.clock() - t0) * 1e3
    local ms = e0:elapsedTime(e1)
    -- the events lie inside the host's interval (however slow the GPU runs, e.g. under a sanitizer)
    assert.is_true(type(ms) == 'number' and ms > 0 and ms <= wall_ms + 0.1)
    local med, mn = fa.cuda.time(function() x:add_(1) end, 5)
    assert.is_true(med >= mn and mn > 0)
  end)

  git('counts allocated, cached and peak bytes; empties the cache', function()
    collectgarbage('collect')
    C.fa_cuda_gc_reset(0) -- no GC-hook collection during this test: the counts below are exact
    local s0 = fa.cuda.memoryStats()
    local x = fa.empty(1000, { device = 'cuda' }) -- 4000 bytes: one 4096-byte block
    local s1 = fa.cuda.memoryStats()
    assert.are.equal(s0.allocated + 4096, s1.allocated)
    assert.is_true(s1.peak >= s1.allocated)
    fa.cuda.resetPeakStats()
    assert.are.equal(s1.allocated, fa.cuda.memoryStats().peak)
    x = nil
    collectgarbage('collect')
    local s2 = fa.cuda.memoryStats()
    assert.are.equal(s0.allocated, s2.allocated)
    assert.is_true(s2.cached >= 4096)
    -- the freed block is reused for a request of the same size class: nothing new is reserved
    local y = fa.empty(1020, { device = 'cuda' })
    local s3 = fa.cuda.memoryStats()
    assert.are.equal(s2.reserved, s3.reserved)
    assert.are.equal(s2.cached - 4096, s3.cached)
    -- large sizes round to 2 MiB (y stays referenced so that no collection changes the count meanwhile)
    local z = fa.empty(3 * 1024 * 1024 + 1, { dtype = 'bool', device = 'cuda' })
    assert.are.equal(s3.allocated + 4 * 1024 * 1024, fa.cuda.memoryStats().allocated)
    assert.are.equal(1020, y:numel())
    y, z = nil, nil
    fa.cuda.emptyCache()
    assert.are.equal(0, fa.cuda.memoryStats().cached)
  end)

  git('keeps memory flat over a 2000-step loop that allocates every step, without collectgarbage', function()
    collectgarbage('collect')
    local w = fa.randn(1, 1024, { device = 'cuda' })
    local maxa, maxr = { 0, 0 }, { 0, 0 }
    local steps, step_bytes = 2000, 0
    for step = 1, steps do
      local before = fa.cuda.memoryStats().sinceGC
      -- about 10 MB of temporaries per step, all garbage at the end of the step
      local x = fa.randn(512, 1024, { device = 'cuda' })
      local h = (x + w):tanh()
      local loss = (h * h):mean(2):sum(1)
      local g = h:mul(2):addcmul(h, h, -1)
      if step % 200 == 0 then assert.is_true(loss:item() >= 0) end
      local st = fa.cuda.memoryStats()
      if st.sinceGC > before then step_bytes = math.max(step_bytes, st.sinceGC - before) end
      local half = step <= steps / 2 and 1 or 2
      maxa[half] = math.max(maxa[half], st.allocated)
      maxr[half] = math.max(maxr[half], st.reserved)
    end
    -- bytes in use do not grow from the first half to the second, and neither do the bytes the allocator
    -- holds (in use + cached): up to one step's allocations, by which the collection points may shift
    assert.is_true(maxa[2] <= maxa[1] + step_bytes, string.format('allocated grew: %d then %d (step %d)', maxa[1], maxa[2], step_bytes))
    assert.is_true(maxr[2] <= maxr[1] + step_bytes, string.format('reserved grew: %d then %d (step %d)', maxr[1], maxr[2], step_bytes))
    -- the GC hook keeps garbage below its threshold (plus one step)
    assert.is_true(maxa[2] < fa.gcThresholdBytes + 2 * step_bytes + 64 * 1024 * 1024, 'allocated ' .. maxa[2])
  end)

  git('raises a Lua error for tensors on different devices, and goes on', function()
    local a, b = fa.randn(5), fa.randn(5, { device = 'cuda' })
    local ok, err = pcall(function() return a + b end)
    assert.is_false(ok)
    assert.matches("Tensor:add: argument 'other': expected a tensor on cpu (as 'self')", err, 1, true)
    -- the C entry itself refuses, naming the argument and the devices
    local out = fa.empty(5, { device = 'cuda' })
    local msg = c_error('fa_binary_forward', OP.add, out, a, b, 1)
    assert.matches("argument", msg, 1, true)
    assert.matches("cuda:0", msg, 1, true)
    assert.matches("cpu", msg, 1, true)
    msg = c_error('fa_matmul_forward', out:view(5, 1), a:view(5, 1), b:view(1, 5):view(1, 5), 0, 0, 1, 0)
    assert.matches('cuda:0', msg, 1, true)
    -- the process goes on and the GPU still works
    H.assert_close(b + b, (b:cpu() * 2), 0, 0, 'b + b after the error')
  end)

  git('turns CUDA out-of-memory into a Lua error, and goes on #cuda_error', function()
    local ok, err = pcall(fa.empty, 2 ^ 50, { dtype = 'bool', device = 'cuda' })
    assert.is_false(ok)
    assert.matches('out of memory', err, 1, true)
    local x = fa.ones(7, { device = 'cuda' })
    assert.are.equal(7, x:sum())
  end)

  git('prints CUDA tensors', function()
    local s = tostring(fa.tensor({ { 1, 2 }, { 3, 4 } }):cuda())
    assert.matches('(cuda:0)', s, 1, true)
    assert.matches('4', s, 1, true)
  end)
end)

describe('fa.cuda copies and casts #gpu', function()
  local DT = { 'float32', 'float64', 'bfloat16', 'float16', 'int32', 'int64', 'bool' }
  -- values that every dtype holds exactly after the CPU cast (casts are compared against the CPU's casts)
  local function values(n)
    local x = fa.randn(n):mul(300)
    x:narrow(1, 1, math.min(n, 5)):copy(fa.tensor({ 0, -1.5, 2.5, 65504, -70000 }):narrow(1, 1, math.min(n, 5)))
    return x
  end
  git('casts every dtype pair host->device, device->device and device->host as the CPU does', function()
    local x = values(1009)
    for _, s in ipairs(DT) do
      local xs = x:to(s)           -- CPU source of dtype s
      local xg = xs:cuda()
      exact(xg:cpu(), xs, s .. ' round trip')
      for _, d in ipairs(DT) do
        local want = xs:to(d)      -- the CPU's cast
        exact(xs:to(d, 'cuda'):cpu(), want, s .. '->' .. d .. ' host->device')
        exact(xg:to(d), want, s .. '->' .. d .. ' device->device')
        exact(xg:to(d, 'cpu'), want, s .. '->' .. d .. ' device->host')
      end
    end
  end)
  git('copies strided views in every direction, with and without a cast', function()
    local x = fa.randn(13, 7, 5)
    for _, d in ipairs({ 'float32', 'bfloat16', 'float64' }) do
      local want = x:permute(3, 1, 2):to(d)
      -- host strided -> device contiguous / strided
      exact(fa.empty(5, 13, 7, { dtype = d, device = 'cuda' }):copy(x:permute(3, 1, 2)):cpu(), want, 'h2d strided src ' .. d)
      local g = fa.zeros(13, 7, 5, { dtype = d, device = 'cuda' })
      g:permute(3, 1, 2):copy(x:permute(3, 1, 2))
      exact(g:cpu(), x:to(d), 'h2d strided dst ' .. d)
      -- device strided -> host contiguous / strided
      local xg = x:cuda()
      exact(fa.empty(5, 13, 7, d):copy(xg:permute(3, 1, 2)), want, 'd2h strided src ' .. d)
      local h = fa.zeros(5, 13, 7, d)
      h:permute(2, 3, 1):copy(xg)
      exact(h, x:permute(3, 1, 2):to(d), 'd2h strided dst ' .. d)
      -- device strided -> device strided
      local g2 = fa.zeros(7, 13, 5, { dtype = d, device = 'cuda' })
      g2:transpose(1, 2):copy(xg:narrow(3, 1, 5))
      exact(g2:transpose(1, 2):cpu(), x:to(d), 'd2d strided ' .. d)
      -- a broadcast (stride 0) source
      local row = fa.randn(1, 5)
      exact(fa.empty(9, 5, { dtype = d, device = 'cuda' }):copy(row:cuda():expand(9, 5)):cpu(), row:expand(9, 5):to(d), 'expand ' .. d)
    end
    -- a misaligned (narrowed) contiguous view, same dtype
    local y = fa.randn(1009)
    local yg = fa.zeros(1009, { device = 'cuda' })
    yg:narrow(1, 2, 1007):copy(y:narrow(1, 3, 1007))
    exact(yg:narrow(1, 2, 1007):cpu(), y:narrow(1, 3, 1007), 'narrowed')
    assert.are.equal(0, yg:get(1))
    assert.are.equal(0, yg:get(1009))
  end)
  git('transposes and permutes made contiguous match the CPU for every element size', function()
    for _, d in ipairs({ 'float32', 'bfloat16', 'float64', 'bool', 'int32' }) do
      local x = values(37 * 1009):view(37, 1009):to(d)
      local xg = x:cuda()
      exact(xg:t():contiguous():cpu(), x:t():contiguous(), 't() ' .. d)
      exact(xg:narrow(2, 3, 1000):t():contiguous():cpu(), x:narrow(2, 3, 1000):t():contiguous(), 'narrowed t() ' .. d)
      local y = values(5 * 33 * 65):view(5, 33, 65):to(d)
      local yg = y:cuda()
      exact(yg:permute(1, 3, 2):contiguous():cpu(), y:permute(1, 3, 2):contiguous(), 'batched permute ' .. d)
      exact(yg:permute(3, 1, 2):contiguous():cpu(), y:permute(3, 1, 2):contiguous(), 'permute (3, 1, 2) ' .. d)
      local z = values(2 * 3 * 40 * 50):view(2, 3, 40, 50):to(d)
      exact(z:cuda():permute(1, 4, 2, 3):contiguous():cpu(), z:permute(1, 4, 2, 3):contiguous(), '4-D permute ' .. d)
      -- into a strided destination with a unit last stride
      local g = fa.zeros(1009, 40, { dtype = d, device = 'cuda' })
      g:narrow(2, 2, 37):copy(xg:t())
      local c = fa.zeros(1009, 40, d)
      c:narrow(2, 2, 37):copy(x:t())
      exact(g:cpu(), c, 'into a narrowed destination ' .. d)
    end
  end)
  git('moves 3x1000003 elements both ways', function()
    local x = fa.randn(3, 1000003)
    local xg = x:cuda()
    exact(xg:cpu(), x, 'round trip')
    exact(xg:t():contiguous():t():cpu(), x, 'transposed copy on the device')
    exact(xg:to('bfloat16'):cpu(), x:to('bfloat16'), 'bf16 cast')
  end)
  git('fills every dtype, contiguous and strided', function()
    for _, d in ipairs(DT) do
      for _, v in ipairs({ 0, 1, -2.75, 1e30, 7 }) do
        -- a value the dtype cannot hold (1e30 in float16, -2.75 in int32) is refused on both devices alike
        local okc, c = pcall(function() return fa.empty(17, 31, d):fill(v) end)
        local okg, g = pcall(function() return fa.empty(17, 31, { dtype = d, device = 'cuda' }):fill(v) end)
        assert.are.equal(okc, okg, 'fill ' .. d .. ' ' .. v .. ': ' .. tostring(okc and g or c))
        if okc then exact(g:cpu(), c, 'fill ' .. d .. ' ' .. v) end
      end
      local g = fa.zeros(17, 31, { dtype = d, device = 'cuda' })
      g:t():narrow(1, 3, 5):fill(3)
      local c = fa.zeros(17, 31, d)
      c:t():narrow(1, 3, 5):fill(3)
      exact(g:cpu(), c, 'strided fill ' .. d)
    end
    local big = fa.empty(3, 1000003, { device = 'cuda' }):fill(0.5)
    assert.are.equal(0.5 * 3 * 1000003, big:sum())
    exact(fa.empty(1009, { device = 'cuda' }):narrow(1, 2, 1001):fill(4):cpu(), fa.full({ 1001 }, 4), 'misaligned fill')
  end)
end)

describe('fa.cuda random numbers #gpu', function()
  git('draws the CPU numbers for the same seed (uniform, every float dtype)', function()
    for _, d in ipairs({ 'float32', 'float64', 'bfloat16', 'float16' }) do
      fa.manualSeed(1234)
      local a = fa.rand(1009, 17, d)
      fa.manualSeed(1234)
      local b = fa.rand(1009, 17, { dtype = d, device = 'cuda' })
      exact(b:cpu(), a, 'rand ' .. d)
    end
    -- a strided view fills by its row-major element order, as on the CPU
    local c, g = fa.empty(17, 1009), fa.empty(17, 1009, { device = 'cuda' })
    fa.manualSeed(7)
    c:t():uniform(-2, 3)
    fa.manualSeed(7)
    g:t():uniform(-2, 3)
    exact(g:cpu(), c, 'uniform on a transposed view')
  end)
  git('draws the CPU normals for the same seed (to float32 rounding of CUDA libm)', function()
    for _, d in ipairs({ 'float32', 'float64', 'bfloat16', 'float16' }) do
      fa.manualSeed(99)
      local a = fa.randn(3, 100003, d)
      fa.manualSeed(99)
      local b = fa.randn(3, 100003, { dtype = d, device = 'cuda' }):cpu()
      -- CUDA's double log/cos may differ from glibc's in the last bit of a double: after rounding to the
      -- dtype the numbers agree except, very rarely, by one ulp of the dtype
      local tol = ({ float32 = 2 ^ -23, float64 = 1e-14, bfloat16 = 2 ^ -7, float16 = 2 ^ -10 })[d]
      H.assert_close(b, a, tol, 1e-30, 'randn ' .. d)
      local xa, xb = a:double(), b:double()
      local pa, pb = ffi.cast('double*', xa.desc.data), ffi.cast('double*', xb.desc.data)
      local diff = 0
      for i = 0, xa:numel() - 1 do if pa[i] ~= pb[i] then diff = diff + 1 end end
      if d ~= 'float64' then -- float64 keeps the last-bit differences; the narrower types hide them
        assert.is_true(diff <= xa:numel() * 1e-4, d .. ': ' .. diff .. ' of ' .. xa:numel() .. ' differ')
      end
    end
    fa.manualSeed(5)
    local a = fa.randn(1000003):mul(2):add(1)
    fa.manualSeed(5)
    local b = fa.randn(1000003, { device = 'cuda' }):mul(2):add(1)
    H.assert_close(b, a, 2 ^ -22, 1e-30, 'randn 1000003')
  end)
end)

describe('fa.cuda elementwise #gpu', function()
  local function inputs(shape, dt, positive)
    local x = fa.randn(shape)
    if positive then x = x:abs():add(0.05) end
    return q(x, dt)
  end

  for _, dt in ipairs(FLOATS) do
    local shapes = { unpack(SHAPES) }
    shapes[#shapes + 1] = BIG
    for _, shape in ipairs(shapes) do
      local name = dt .. ' ' .. shape_name(shape)
      git('binary ops, scale and addcmul are bit-identical to the CPU (' .. name .. ')', function()
        local a, b, c = inputs(shape, dt), inputs(shape, dt), inputs(shape, dt)
        local bd = q(b:abs():add(0.5), dt) -- a divisor away from zero
        local ag, bg, cg, bdg = up(a, dt), up(b, dt), up(c, dt), up(bd, dt)
        exact(ag + bg, ref(a + b, dt), 'add')
        exact(ag:add(bg, 2.5), ref(a:add(b, 2.5), dt), 'add alpha')
        exact(ag - bg, ref(a - b, dt), 'sub')
        exact(ag:sub(bg, -0.75), ref(a:sub(b, -0.75), dt), 'sub alpha')
        exact(ag * bg, ref(a * b, dt), 'mul')
        exact(ag / bdg, ref(a / bd, dt), 'div')
        exact(ag:scale(2.5, -0.75), ref(a:scale(2.5, -0.75), dt), 'scale')
        exact(ag:addcmul(bg, cg, 0.7), ref(a:addcmul(b, c, 0.7), dt), 'addcmul')
        exact(ag:clone():mul_(bg), ref(a * b, dt), 'mul_ in place')
      end)
    end
  end

  for _, dt in ipairs(FLOATS) do
    git('binary ops on views: transposed, broadcast, narrowed (' .. dt .. ')', function()
      local a, b, r = inputs({ 31, 17 }, dt), inputs({ 17 }, dt), inputs({ 1, 17 }, dt)
      local ag, bg, rg = up(a, dt), up(b, dt), up(r, dt)
      exact(ag + bg, ref(a + b, dt), 'broadcast row')
      exact(ag:t() * rg:t(), ref(a:t() * r:t(), dt), 'transposed * broadcast column')
      -- (intermediate results that the GPU stores in dt are rounded to dt on the CPU side too)
      exact(ag:t():div(ag:t():abs():add(1)), ref(a:t():div(q(a:t():abs():add(1), dt)), dt), 'transposed div')
      local n = ag:narrow(2, 2, 13)
      exact(n - n:mul(3), ref(a:narrow(2, 2, 13) - q(a:narrow(2, 2, 13):mul(3), dt), dt), 'narrowed')
      exact(ag:narrow(1, 2, 29):contiguous():view(-1):narrow(1, 2, 400):add(1),
            ref(a:narrow(1, 2, 29):contiguous():view(-1):narrow(1, 2, 400):add(1), dt), 'misaligned contiguous')
      local out = fa.zeros(17, 31, { dtype = dt, device = 'cuda' })
      fa.check(cc('fa_binary_forward', OP.mul, out:t(), ag, up(a, dt):mul(2), -1.5))
      local cout = fa.zeros(17, 31)
      fa.check(cc('fa_binary_forward', OP.mul, cout:t(), a, q(a:mul(2), dt), -1.5))
      exact(out, ref(cout, dt), 'strided output')
    end)
  end

  for _, it_dt in ipairs({ 'int32', 'int64' }) do
    git('integer binary ops, scale, addcmul and abs/sign/neg/relu match the CPU exactly (' .. it_dt .. ')', function()
      local a = fa.randn(3, 1009):mul(1000):to(it_dt)
      local b = fa.randn(3, 1009):mul(1000):to(it_dt)
      local d = fa.randn(3, 1009):abs():mul(50):add(1):to(it_dt)
      local ag, bg, dg = a:cuda(), b:cuda(), d:cuda()
      for name, op in pairs(OP) do
        local bb, bbg = (name == 'div') and d or b, (name == 'div') and dg or bg
        local o, og = fa.empty(3, 1009, it_dt), fa.empty(3, 1009, { dtype = it_dt, device = 'cuda' })
        fa.check(cc('fa_binary_forward', op, o, a, bb, name == 'div' and 1 or 3))
        fa.check(cc('fa_binary_forward', op, og, ag, bbg, name == 'div' and 1 or 3))
        exact(og, o, it_dt .. ' ' .. name)
        if name ~= 'div' then
          local ga, gb = fa.empty(3, 1009, it_dt), fa.empty(3, 1009, it_dt)
          local gag, gbg = fa.empty(3, 1009, { dtype = it_dt, device = 'cuda' }), fa.empty(3, 1009, { dtype = it_dt, device = 'cuda' })
          fa.check(cc('fa_binary_backward', op, ga, gb, d, a, b))
          fa.check(cc('fa_binary_backward', op, gag, gbg, dg, ag, bg))
          exact(gag, ga, it_dt .. ' ' .. name .. ' grad_a')
          exact(gbg, gb, it_dt .. ' ' .. name .. ' grad_b')
        end
      end
      exact(ag:scale(3, -7), a:scale(3, -7), 'scale exact')
      -- a fractional scale of an integer tensor is refused on both devices (no silent truncation)
      assert.has_error(function() ag:scale(0.5, 0.25) end)
      assert.has_error(function() a:scale(0.5, 0.25) end)
      exact(ag:addcmul(bg, dg, 3), a:addcmul(b, d, 3), 'addcmul')
      exact(ag:t():add(bg:t()), a:t():add(b:t()), 'strided add')
      for _, u in ipairs({ 'abs', 'sign', 'neg', 'relu' }) do exact(ag[u](ag), a[u](a), it_dt .. ' ' .. u) end
    end)
  end

  for _, dt in ipairs(FLOATS) do
    local shapes = { { 1 }, { 1009 }, { 2, 3, 5, 7 } }
    if dt ~= 'float16' then shapes[#shapes + 1] = BIG end
    for _, shape in ipairs(shapes) do
      git('unary forward (all ten) against the CPU (' .. dt .. ' ' .. shape_name(shape) .. ')', function()
        for _, u in ipairs(UNARY_NAMES) do
          local x = inputs(shape, dt, POSITIVE[u])
          local yg = up(x, dt)[u](up(x, dt))
          local yc = ref(x[u](x), dt)
          if EXACT_UNARY[u] then exact(yg, yc, u)
          elseif dt == 'float32' then H.assert_close(yg, yc, 1e-6, 1e-6, u)
          else H.assert_close(yg, yc, ULP16[dt], 1e-6, u) end
        end
      end)
    end
    git('unary backward (all ten, from x and from y) against the CPU (' .. dt .. ')', function()
      for _, shape in ipairs({ { 1 }, { 1009 }, { 17, 31 } }) do
        for _, u in ipairs(UNARY_NAMES) do
          local op = UNARY[u]
          local x = inputs(shape, dt, POSITIVE[u])
          local y = q(x[u](x), dt)            -- the same y on both sides
          local g = inputs(shape, dt)
          local xg, yg, gg = up(x, dt), up(y, dt), up(g, dt)
          for _, from_y in ipairs({ true, false }) do
            local gx, gxg = fa.empty(shape), fa.empty(shape, { dtype = dt, device = 'cuda' })
            fa.check(cc('fa_unary_backward', op, gx, g, x, from_y and y or nil))
            fa.check(cc('fa_unary_backward', op, gxg, gg, xg, from_y and yg or nil))
            local what = u .. (from_y and ' (from y)' or ' (from x)') .. ' ' .. shape_name(shape)
            local uses_libm = u == 'gelu' or (not from_y and (u == 'exp' or u == 'tanh' or u == 'sigmoid'))
            if not uses_libm then exact(gxg, ref(gx, dt), what)
            elseif dt == 'float32' then H.assert_close(gxg, gx, 1e-6, 1e-6, what)
            else H.assert_close(gxg, ref(gx, dt), ULP16[dt], 1e-6, what) end
          end
        end
      end
      -- a transposed grad_y / x and a transposed output
      local x, g = inputs({ 31, 17 }, dt), inputs({ 31, 17 }, dt)
      local gx, gxg = fa.empty(17, 31), fa.empty(17, 31, { dtype = dt, device = 'cuda' })
      fa.check(cc('fa_unary_backward', UNARY.relu, gx, g:t(), x:t(), nil))
      fa.check(cc('fa_unary_backward', UNARY.relu, gxg, up(g, dt):t(), up(x, dt):t(), nil))
      exact(gxg, ref(gx, dt), 'relu backward on views')
    end)
    git('binary backward against the CPU, both grads and one (' .. dt .. ')', function()
      for _, shape in ipairs({ { 1 }, { 1009 }, BIG }) do
        local a, b, g = inputs(shape, dt), q(inputs(shape, dt):abs():add(0.5), dt), inputs(shape, dt)
        local ag, bg, gg = up(a, dt), up(b, dt), up(g, dt)
        for name, op in pairs(OP) do
          local ga, gb = fa.empty(shape), fa.empty(shape)
          local gag, gbg = fa.empty(shape, { dtype = dt, device = 'cuda' }), fa.empty(shape, { dtype = dt, device = 'cuda' })
          fa.check(cc('fa_binary_backward', op, ga, gb, g, a, b))
          fa.check(cc('fa_binary_backward', op, gag, gbg, gg, ag, bg))
          exact(gag, ref(ga, dt), name .. ' grad_a ' .. shape_name(shape))
          exact(gbg, ref(gb, dt), name .. ' grad_b ' .. shape_name(shape))
          local only = fa.zeros(shape, { dtype = dt, device = 'cuda' })
          fa.check(cc('fa_binary_backward', op, nil, only, gg, ag, bg))
          exact(only, ref(gb, dt), name .. ' grad_b alone')
          fa.check(cc('fa_binary_backward', op, only, nil, gg, op >= 2 and ag or nil, op >= 2 and bg or nil))
          exact(only, ref(ga, dt), name .. ' grad_a alone')
        end
      end
    end)
  end
end)

describe('fa.cuda reductions #gpu', function()
  -- per-output tolerance for float32 sums: 1e-5 of the sum of |x| along the reduced dim (the GPU adds in
  -- float32 in another order; the CPU in double)
  local function sum_tol(x, dim)
    local s = dim and x:abs():double():sum(dim) or fa.tensor({ x:abs():double():sum() })
    return s
  end
  local function check_sum(got, want, absx, rel, what)
    local g, w, a = got:double():cpu():contiguous():view(-1), want:double():contiguous():view(-1), absx:contiguous():view(-1)
    local pg, pw, pa = ffi.cast('double*', g.desc.data), ffi.cast('double*', w.desc.data), ffi.cast('double*', a.desc.data)
    for i = 0, g:numel() - 1 do
      local tol = rel * pa[i] + 1e-30
      if not (math.abs(pg[i] - pw[i]) <= tol) then
        error(string.format('%s: element %d: got %.9g, want %.9g (tolerance %.3g)', what, i, pg[i], pw[i], tol), 2)
      end
    end
  end

  local cases = {
    { { 1 }, 1 }, { { 1009 }, 1 }, { { 17, 31, 5 }, 1 }, { { 17, 31, 5 }, 2 }, { { 17, 31, 5 }, 3 },
    { BIG, 1 }, { BIG, 2 }, { { 1000003, 3 }, 1 }, { { 1000003, 3 }, 2 }, { { 2, 3, 5, 7 }, 3 }, { { 5, 1, 7 }, 2 },
  }
  for _, dt in ipairs(FLOATS) do
    for _, case in ipairs(cases) do
      local shape, dim = case[1], case[2]
      git(string.format('sum/mean/max/argmax over dim %d of %s against the CPU (%s)', dim, shape_name(shape), dt), function()
        local x = q(fa.randn(shape), dt)
        local xg = up(x, dt)
        local absx = x:abs():double():sum(dim)
        local rel = dt == 'float32' and 1e-5 or ULP16[dt]
        check_sum(xg:sum(dim), ref(x:sum(dim), dt), absx, rel, 'sum')
        check_sum(xg:mean(dim), ref(x:mean(dim), dt), absx:div(shape[dim]), rel, 'mean')
        local mg, ig = xg:max(dim)
        local mc, ic = x:max(dim)
        exact(mg, mc, 'max values')
        exact(ig, ic, 'max indices')
        exact(xg:argmax(dim), x:argmax(dim), 'argmax')
      end)
    end
    git('reductions over all elements and of non-contiguous views (' .. dt .. ')', function()
      for _, shape in ipairs({ { 1 }, { 1009 }, { 17, 31, 5 }, BIG }) do
        local x = q(fa.randn(shape), dt)
        local xg = up(x, dt)
        local s = x:abs():double():sum()
        local rel = dt == 'float32' and 1e-5 or ULP16[dt]
        local got, want = xg:sum(), ref(fa.tensor({ x:sum() }), dt):item()
        assert.is_true(math.abs(got - want) <= rel * s, string.format('sum all %s: %.9g vs %.9g', shape_name(shape), got, want))
        assert.is_true(math.abs(xg:mean() - ref(fa.tensor({ x:mean() }), dt):item()) <= rel * s / x:numel() + 1e-30, 'mean all')
        assert.are.equal(x:max(), xg:max())
        assert.are.equal(x:argmax(), xg:argmax())
      end
      local x = q(fa.randn(31, 17, 5), dt)
      local xt, xtg = x:permute(3, 1, 2), up(x, dt):permute(3, 1, 2)
      for dim = 1, 3 do
        check_sum(xtg:sum(dim), ref(xt:sum(dim), dt), xt:abs():double():sum(dim), dt == 'float32' and 1e-5 or ULP16[dt], 'permuted sum ' .. dim)
        local m, i = xtg:max(dim)
        local mc, ic = xt:max(dim)
        exact(m, mc, 'permuted max ' .. dim)
        exact(i, ic, 'permuted max idx ' .. dim)
      end
      local want = ref(fa.tensor({ xt:narrow(2, 3, 7):sum() }), dt):item()
      assert.is_true(math.abs(xtg:narrow(2, 3, 7):sum() - want) <= (dt == 'float32' and 1e-5 or ULP16[dt]) * x:abs():sum())
      assert.are.equal(xt:narrow(2, 3, 7):argmax(), xtg:narrow(2, 3, 7):argmax())
    end)
  end

  for _, dt in ipairs(FLOATS) do
    git('reductions of narrowed rows (unaligned starts) against the CPU (' .. dt .. ')', function()
      local rel = dt == 'float32' and 1e-5 or ULP16[dt]
      for _, c in ipairs({ { 3, 1009, 2, 1000 }, { 5, 100003, 3, 99999 }, { 7, 64, 2, 61 }, { 9, 300, 4, 293 } }) do
        local x = q(fa.randn(c[1], c[2]), dt)
        local xn, xgn = x:narrow(2, c[3], c[4]), up(x, dt):narrow(2, c[3], c[4])
        local what = string.format('%dx%d narrowed to %d from %d', c[1], c[2], c[4], c[3])
        check_sum(xgn:sum(2), ref(xn:sum(2), dt), xn:abs():double():sum(2), rel, 'sum ' .. what)
        local m, i = xgn:max(2)
        local mc, ic = xn:max(2)
        exact(m, mc, 'max ' .. what)
        exact(i, ic, 'max idx ' .. what)
        exact(xgn:argmax(2), xn:argmax(2), 'argmax ' .. what)
        local row, rowg = xn:select(1, 2), xgn:select(1, 2) -- one row: dim -1 on a contiguous, unaligned view
        local want = ref(fa.tensor({ row:sum() }), dt):item()
        assert.is_true(math.abs(rowg:sum() - want) <= rel * row:abs():sum(), 'sum all ' .. what)
        assert.are.equal(row:argmax(), rowg:argmax())
      end
    end)
  end

  git('max picks the first maximum and NaN, as the CPU', function()
    local x = fa.tensor({ { 1, 5, 5, 2 }, { 0 / 0, 3, 0 / 0, 9 }, { -1, -1, -1, -1 } })
    for _, dt in ipairs(FLOATS) do
      local xg = x:to(dt, 'cuda')
      local _, i = xg:max(2)
      local _, ic = x:max(2)
      exact(i, ic, 'first max / NaN ' .. dt)
      assert.are.same({ { 2 }, { 1 }, { 1 } }, i:table())
      assert.are.equal(5, xg:narrow(1, 1, 1):max())
    end
    local many = fa.full({ 3, 100003 }, 2)
    many:set(2, 77777, 3); many:set(2, 88888, 3)
    assert.are.equal(100003 + 77777, many:cuda():argmax())
  end)

  git('integer sums and max are exact (int32, int64)', function()
    for _, it_dt in ipairs({ 'int32', 'int64' }) do
      local x = fa.randn(BIG):mul(1000):to(it_dt)
      local xg = x:cuda()
      for dim = 1, 2 do
        exact(xg:sum(dim), x:sum(dim), it_dt .. ' sum ' .. dim)
        local m, i = xg:max(dim)
        local mc, ic = x:max(dim)
        exact(m, mc, it_dt .. ' max ' .. dim)
        exact(i, ic, it_dt .. ' max idx ' .. dim)
      end
      assert.are.equal(x:sum(), xg:sum())
      assert.are.equal(x:argmax(), xg:argmax())
    end
  end)

  git('reduction backward (sum, mean, max; a dim and all) against the CPU', function()
    for _, dt in ipairs(FLOATS) do
      for _, case in ipairs({ { { 17, 31, 5 }, 1 }, { { 17, 31, 5 }, 2 }, { BIG, 1 }, { { 1009 }, 0 }, { { 17, 31 }, -1 } }) do
        local shape, dim = case[1], case[2]
        local x = q(fa.randn(shape), dt)
        local oshape = { unpack(shape) }
        if dim >= 0 then oshape[dim + 1] = 1 else oshape = { 1 } end
        local go = q(fa.randn(oshape), dt)
        local gog = up(go, dt)
        for _, op in ipairs({ RED.sum, RED.mean, RED.max }) do
          local idx, idxg
          if op == RED.max then
            idx = fa.empty(oshape, 'int64')
            fa.check(cc('fa_reduce_forward', RED.max, fa.empty(oshape), idx, x, dim))
            idxg = idx:cuda()
          end
          local gx, gxg = fa.empty(shape), fa.full(shape, 7, { dtype = dt, device = 'cuda' })
          fa.check(cc('fa_reduce_backward', op, gx, go, idx and idx, dim))
          fa.check(cc('fa_reduce_backward', op, gxg, gog, idxg and idxg, dim))
          exact(gxg, ref(gx, dt), string.format('backward op %d dim %d %s %s', op, dim, shape_name(shape), dt))
        end
      end
    end
    -- a strided grad_x
    local go = fa.randn(17, 1)
    local gx = fa.zeros(31, 17, { device = 'cuda' })
    fa.check(cc('fa_reduce_backward', RED.mean, gx:t(), go:cuda(), nil, 1))
    local gc = fa.zeros(31, 17)
    fa.check(cc('fa_reduce_backward', RED.mean, gc:t(), go, nil, 1))
    exact(gx, gc, 'strided grad_x')
  end)

  git('sum of squares (fa_sumsq) against the CPU', function()
    for _, dt in ipairs(FLOATS) do
      for _, shape in ipairs({ { 1 }, { 1009 }, BIG }) do
        local x = q(fa.randn(shape), dt)
        local out, outg = fa.empty({ 1 }, 'float64'), fa.empty({ 1 }, { device = 'cuda' })
        fa.check(cc('fa_sumsq', out, x))
        fa.check(cc('fa_sumsq', outg, up(x, dt)))
        H.assert_close(outg, out:float(), 1e-6, 0, 'sumsq ' .. dt .. ' ' .. shape_name(shape))
      end
    end
    local x = fa.randn(31, 17)
    local out, outg = fa.empty({ 1 }, 'float64'), fa.empty({ 1 }, { device = 'cuda' })
    fa.check(cc('fa_sumsq', out, x:t()))
    fa.check(cc('fa_sumsq', outg, x:cuda():t()))
    H.assert_close(outg, out:float(), 1e-6, 0, 'sumsq transposed')
  end)
end)

describe('fa.cuda matmul and linear #gpu', function()
  local function mm_case(m, k, n, batch_a, batch_b, dt, ta, tb, alpha, beta, what)
    local function mk(b, r, c, t)
      local s = t and { c, r } or { r, c }
      if b then table.insert(s, 1, b) end
      return q(fa.randn(s), dt)
    end
    local a, b = mk(batch_a, m, k, ta), mk(batch_b, k, n, tb)
    local batch = math.max(batch_a or 1, batch_b or 1)
    local oshape = (batch_a or batch_b) and { batch, m, n } or { m, n }
    local out0 = q(fa.randn(oshape), dt)
    local out, outg = out0:clone(), up(out0, dt)
    fa.check(cc('fa_matmul_forward', out, a, b, ta and 1 or 0, tb and 1 or 0, alpha, beta))
    fa.check(cc('fa_matmul_forward', outg, up(a, dt), up(b, dt), ta and 1 or 0, tb and 1 or 0, alpha, beta))
    local rtol = dt == 'float32' and 1e-5 or ULP16[dt]
    H.assert_close(outg, ref(out, dt), rtol, 2e-6 * k * math.abs(alpha) + 1e-6, what)
  end

  for _, dt in ipairs(FLOATS) do
    git('matrix products against the CPU (' .. dt .. ')', function()
      for _, mkn in ipairs({ { 1, 1, 1 }, { 17, 31, 13 }, { 129, 257, 65 }, { 1, 1009, 3 }, { 300, 7, 200 } }) do
        local m, k, n = mkn[1], mkn[2], mkn[3]
        for _, tr in ipairs({ { false, false }, { true, false }, { false, true }, { true, true } }) do
          mm_case(m, k, n, nil, nil, dt, tr[1], tr[2], 1, 0, string.format('%dx%dx%d ta=%s tb=%s', m, k, n, tostring(tr[1]), tostring(tr[2])))
        end
        mm_case(m, k, n, nil, nil, dt, false, false, 0.5, 2, 'alpha/beta')
        mm_case(m, k, n, 3, 3, dt, false, true, 1, 0, 'batched')
        mm_case(m, k, n, 1, 5, dt, true, false, 1, 0, 'broadcast a')
        mm_case(m, k, n, 4, 1, dt, false, false, -1, 1, 'broadcast b')
      end
    end)
  end

  git('matrix products of views: transposed, narrowed, strided beyond BLAS, strided output', function()
    local a, b = fa.randn(37, 29), fa.randn(29, 23)
    local ag, bg = a:cuda(), b:cuda()
    H.assert_close(ag:t():t():matmul(bg), a:matmul(b), 1e-5, 1e-5, 'plain')
    H.assert_close(bg:t():matmul(ag:t()), b:t():matmul(a:t()), 1e-5, 1e-5, 'transposed views')
    H.assert_close(ag:narrow(2, 3, 20):matmul(bg:narrow(1, 5, 20)), a:narrow(2, 3, 20):matmul(b:narrow(1, 5, 20)), 1e-5, 1e-5, 'narrowed')
    local s = fa.randn(37, 29, 2)
    H.assert_close(s:cuda():select(3, 2):matmul(bg), s:select(3, 2):matmul(b), 1e-5, 1e-5, 'no unit stride (copied)')
    local out, outg = fa.zeros(23, 37), fa.zeros(23, 37, { device = 'cuda' })
    fa.check(cc('fa_matmul_forward', out:t(), a, b, 0, 0, 1, 0))
    fa.check(cc('fa_matmul_forward', outg:t(), ag, bg, 0, 0, 1, 0))
    H.assert_close(outg, out, 1e-5, 1e-5, 'transposed output')
    local o3, o3g = fa.randn(37, 2, 23), nil
    o3g = o3:cuda()
    fa.check(cc('fa_matmul_forward', o3:select(2, 1), a, b, 0, 0, 2, 0.5))
    fa.check(cc('fa_matmul_forward', o3g:select(2, 1), ag, bg, 0, 0, 2, 0.5))
    H.assert_close(o3g, o3, 1e-5, 1e-5, 'output with no unit stride (beta = 0.5)')
    -- batched 4-D through Tensor:matmul (broadcast batch dims)
    local x, y = fa.randn(2, 3, 17, 9), fa.randn(3, 9, 11)
    H.assert_close(x:cuda():matmul(y:cuda()), x:matmul(y), 1e-5, 1e-5, '4-D @ 3-D')
    -- k = 0: out = beta * out
    local e0, e1 = fa.empty(5, 0, { device = 'cuda' }), fa.empty(0, 4, { device = 'cuda' })
    local o = fa.full({ 5, 4 }, 3, { device = 'cuda' })
    fa.check(cc('fa_matmul_forward', o, e0, e1, 0, 0, 1, 0.5))
    exact(o, fa.full({ 5, 4 }, 1.5), 'k = 0')
  end)

  git('TF32 changes float32 products only when allowed', function()
    local a, b = fa.randn(256, 512), fa.randn(512, 256)
    local ag, bg = a:cuda(), b:cuda()
    local want = a:matmul(b)
    H.assert_close(ag:matmul(bg), want, 1e-5, 1e-4, 'fp32')
    fa.cuda.allowTF32(true)
    local t = ag:matmul(bg)
    fa.cuda.allowTF32(false)
    H.assert_close(t, want, 2e-2, 0.2, 'tf32 (10-bit mantissa inputs)')
    H.assert_close(ag:matmul(bg), want, 1e-5, 1e-4, 'fp32 again after TF32 off')
  end)

  git('linear forward with bias at larger sizes, TF32 on and off, aligned and unaligned bias', function()
    local x, w, b = fa.randn(2048, 256), fa.randn(384, 256), fa.randn(384)
    local want = fa.empty(2048, 384)
    fa.check(cc('fa_linear_forward', want, x, w, b))
    local xg, wg, bg = x:cuda(), w:cuda(), b:cuda()
    local out = fa.empty(2048, 384, { device = 'cuda' })
    fa.check(cc('fa_linear_forward', out, xg, wg, bg))
    H.assert_close(out, want, 1e-5, 1e-3, 'fp32')
    fa.cuda.allowTF32(true)
    fa.check(cc('fa_linear_forward', out, xg, wg, bg))
    fa.cuda.allowTF32(false)
    H.assert_close(out, want, 2e-2, 0.15, 'tf32')
    fa.check(cc('fa_linear_forward', out, xg, wg, bg))
    H.assert_close(out, want, 1e-5, 1e-3, 'fp32 again')
    local xb, wb, bb = q(x, 'bfloat16'), q(w, 'bfloat16'), q(b, 'bfloat16')
    fa.check(cc('fa_linear_forward', want, xb, wb, bb))
    local outb = fa.empty(2048, 384, { dtype = 'bfloat16', device = 'cuda' })
    fa.check(cc('fa_linear_forward', outb, up(xb, 'bfloat16'), up(wb, 'bfloat16'), up(bb, 'bfloat16')))
    H.assert_close(outb, ref(want, 'bfloat16'), ULP16.bfloat16, 1e-3, 'bf16')
    -- a bias that is not 16-byte aligned (a narrowed view): same numbers
    local b2 = fa.randn(385)
    fa.check(cc('fa_linear_forward', want, x, w, b2:narrow(1, 2, 384)))
    local b2g = b2:cuda()
    fa.check(cc('fa_linear_forward', out, xg, wg, b2g:narrow(1, 2, 384)))
    H.assert_close(out, want, 1e-5, 1e-3, 'unaligned bias')
  end)

  for _, dt in ipairs(FLOATS) do
    git('linear forward and backward (accumulating) against the CPU (' .. dt .. ')', function()
      for _, sh in ipairs({ { { 5, 7, 33 }, 17 }, { { 1, 1 }, 1 }, { { 1009, 64 }, 129 } }) do
        local xs, outf = sh[1], sh[2]
        local inf = xs[#xs]
        local x, w, b = q(fa.randn(xs), dt), q(fa.randn(outf, inf), dt), q(fa.randn(outf), dt)
        local oshape = { unpack(xs) }
        oshape[#oshape] = outf
        local out, outg = fa.empty(oshape), fa.empty(oshape, { dtype = dt, device = 'cuda' })
        fa.check(cc('fa_linear_forward', out, x, w, b))
        fa.check(cc('fa_linear_forward', outg, up(x, dt), up(w, dt), up(b, dt)))
        local rtol = dt == 'float32' and 1e-5 or ULP16[dt]
        H.assert_close(outg, ref(out, dt), rtol, 2e-6 * inf + 1e-6, 'linear forward ' .. shape_name(xs))
        -- backward: grad_weight and grad_bias accumulate into their initial values
        local g = q(fa.randn(oshape), dt)
        local gw0, gb0 = q(fa.randn(outf, inf), dt), q(fa.randn(outf), dt)
        local gx, gw, gb = fa.empty(xs), gw0:clone(), gb0:clone()
        local gxg, gwg, gbg = fa.empty(xs, { dtype = dt, device = 'cuda' }), up(gw0, dt), up(gb0, dt)
        fa.check(cc('fa_linear_backward', gx, gw, gb, g, x, w))
        fa.check(cc('fa_linear_backward', gxg, gwg, gbg, up(g, dt), up(x, dt), up(w, dt)))
        local rows = x:numel() / inf
        H.assert_close(gxg, ref(gx, dt), rtol, 2e-6 * outf + 1e-6, 'grad_x')
        H.assert_close(gwg, ref(gw, dt), rtol, 2e-6 * rows + 1e-6, 'grad_weight')
        H.assert_close(gbg, ref(gb, dt), rtol, 2e-6 * rows + 1e-6, 'grad_bias')
        -- without bias, and grads not requested
        fa.check(cc('fa_linear_forward', out, x, w, nil))
        fa.check(cc('fa_linear_forward', outg, up(x, dt), up(w, dt), nil))
        H.assert_close(outg, ref(out, dt), rtol, 2e-6 * inf + 1e-6, 'linear forward without bias')
        local gb2 = up(gb0, dt)
        fa.check(cc('fa_linear_backward', nil, nil, gb2, up(g, dt), up(x, dt), up(w, dt)))
        H.assert_close(gb2, ref(gb, dt), rtol, 2e-6 * rows + 1e-6, 'grad_bias alone')
      end
      -- a strided (transposed) weight and bias
      local x, w, b = q(fa.randn(9, 13), dt), q(fa.randn(13, 7), dt), q(fa.randn(7, 2), dt)
      local out, outg = fa.empty(9, 7), fa.empty(9, 7, { dtype = dt, device = 'cuda' })
      fa.check(cc('fa_linear_forward', out, x, w:t(), b:select(2, 2)))
      fa.check(cc('fa_linear_forward', outg, up(x, dt), up(w, dt):t(), up(b, dt):select(2, 2)))
      H.assert_close(outg, ref(out, dt), dt == 'float32' and 1e-5 or ULP16[dt], 1e-4, 'transposed weight')
    end)
  end
end)

describe('fa.cuda optimiser steps #gpu', function()
  local function flat(n, dt, scale) return q(fa.randn(n):mul(scale or 1), dt) end
  git('SGD (plain, momentum, dampening, nesterov, weight decay) is bit-identical to the CPU over 5 steps', function()
    local cfgs = {
      { lr = 0.1, momentum = 0, dampening = 0, wd = 0, nesterov = 0 },
      { lr = 0.05, momentum = 0.9, dampening = 0, wd = 1e-2, nesterov = 0 },
      { lr = 0.05, momentum = 0.9, dampening = 0.1, wd = 0, nesterov = 0 },
      { lr = 0.01, momentum = 0.8, dampening = 0, wd = 5e-4, nesterov = 1 },
    }
    for _, n in ipairs({ 1, 1009, 3000009 }) do
      for ci, c in ipairs(cfgs) do
        local p, buf = flat(n, 'float32'), fa.zeros(n)
        local pg, bufg = p:cuda(), buf:cuda()
        for step = 1, 5 do
          local g = flat(n, 'float32')
          fa.check(cc('fa_sgd_step', p, g, c.momentum ~= 0 and buf or nil, c.lr, c.momentum, c.dampening, c.wd, c.nesterov, step == 1 and 1 or 0))
          fa.check(cc('fa_sgd_step', pg, g:cuda(), c.momentum ~= 0 and bufg or nil, c.lr, c.momentum, c.dampening, c.wd, c.nesterov, step == 1 and 1 or 0))
        end
        exact(pg, p, 'sgd param cfg ' .. ci .. ' n ' .. n)
        exact(bufg, buf, 'sgd momentum cfg ' .. ci .. ' n ' .. n)
      end
    end
  end)
  git('Adam and AdamW are bit-identical to the CPU over 5 steps', function()
    for _, n in ipairs({ 1, 1009, 3000009 }) do
      for _, dec in ipairs({ 0, 1 }) do
        for _, wd in ipairs({ 0, 0.01 }) do
          local p, m, v = flat(n, 'float32'), fa.zeros(n), fa.zeros(n)
          local pg, mg, vg = p:cuda(), m:cuda(), v:cuda()
          for step = 1, 5 do
            local g = flat(n, 'float32', 0.1)
            fa.check(cc('fa_adam_step', p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, wd, dec, step))
            fa.check(cc('fa_adam_step', pg, g:cuda(), mg, vg, 1e-3, 0.9, 0.999, 1e-8, wd, dec, step))
          end
          local what = string.format('adam n=%d decoupled=%d wd=%g', n, dec, wd)
          exact(pg, p, what .. ' param')
          exact(mg, m, what .. ' exp_avg')
          exact(vg, v, what .. ' exp_avg_sq')
        end
      end
    end
  end)
  for _, dt in ipairs({ 'bfloat16', 'float16' }) do
    git('one SGD and one AdamW step on ' .. dt .. ' buffers round the float32 update once', function()
      local n = 1009
      local p, g, buf = flat(n, dt), flat(n, dt), flat(n, dt)
      local pc, bc = p:clone(), buf:clone()
      fa.check(cc('fa_sgd_step', pc, g, bc, 0.1, 0.9, 0, 0.01, 0, 0))
      local pg, bg = up(p, dt), up(buf, dt)
      fa.check(cc('fa_sgd_step', pg, up(g, dt), bg, 0.1, 0.9, 0, 0.01, 0, 0))
      exact(pg, ref(pc, dt), 'sgd param ' .. dt)
      exact(bg, ref(bc, dt), 'sgd buf ' .. dt)
      local m, v = q(fa.randn(n):mul(0.1), dt), q(fa.rand(n):mul(0.01), dt)
      local p2, m2, v2 = p:clone(), m:clone(), v:clone()
      fa.check(cc('fa_adam_step', p2, g, m2, v2, 1e-2, 0.9, 0.999, 1e-8, 0.01, 1, 3))
      local p2g, m2g, v2g = up(p, dt), up(m, dt), up(v, dt)
      fa.check(cc('fa_adam_step', p2g, up(g, dt), m2g, v2g, 1e-2, 0.9, 0.999, 1e-8, 0.01, 1, 3))
      exact(p2g, ref(p2, dt), 'adamw param ' .. dt)
      exact(m2g, ref(m2, dt), 'adamw m ' .. dt)
      exact(v2g, ref(v2, dt), 'adamw v ' .. dt)
    end)
  end
end)

-- spec/helpers/op.lua: one test harness for every op with a backward, in the manner of ggml's
-- test-backend-ops. An op is a case (a table); op.run(case) registers, inside the current describe:
--   fixtures   forward and every gradient against PyTorch-made fixtures, in float64 and float32; also the
--              op's buffer convention ({out = t}, {grad_x = t | false}: poisoned buffers are filled and
--              returned, false skips a gradient) and non-contiguous inputs (bit-identical results)
--   gradcheck  every gradient against float64 central finite differences
--   threads    forward and backward bit-identical with 1, 2 and 3 threads (float32) and into NaN-poisoned
--              buffers, and close to float64
--   errors     bad inputs raise messages matching their patterns, never at a line inside lua/fastattn/,
--              and write nothing into the given buffers
--   gpu (#gpu) CPU float64 against the GPU in float32, bfloat16 and float16 (the inputs rounded to the dtype
--              first), in every variant of the case, into NaN-poisoned buffers; variants with
--              deterministic = true are bit-identical run to run
-- A case:
--   name        'fa.msda'
--   inputs      function(shape, opts) -> table of inputs (CPU, float64 where floating point)
--   grads       names of the differentiable inputs, e.g. {'value', 'sampling_locations'}
--   forward     function(x, opts) -> output (opts carries the op's options and `out`)
--   backward    function(x, gout, opts) -> {name = gradient} (opts carries `grad_<name>`)
--   float32_on_gpu  set of inputs kept float32 when the GPU dtype is 16-bit
--   convention  false for a module (no out/grad_x buffers); results must then be fresh tensors (clones)
--   fixture     {names = {...}, load = function(name) -> x, opts, gout, want ({out =, <name> =})}
--   mask        optional function(x, opts, name) -> 0/1 tensor of the elements of gradient `name` to
--               compare in float32 (points where a float32 rounding may cross a discontinuity excluded)
--   gradcheck, threads: lists of {shape, opts};  gpu: {shapes = {{shape, opts}...}, variants = {opts...},
--               dtypes = (default op.GPU_DTYPES)}
--   errors      {base = function() -> x, gout; {pattern, {input = value | op.NIL, gout =, opts =}, backward = true}...}
--               (gpu.errors likewise, run in the #gpu block)
--   tol         fixture = {float64 = {rtol, atol, [name] = {rtol, atol}}, float32 = ...}, numgrad = {...},
--               float32 = {rtol, atol, ...} (threads: float32 against float64),
--               gpu = {float32 = t, bfloat16 = t, float16 = t, [name] per dtype}: |a - ref| <= t*(max|ref| + |ref|)
--   gpu.scale   optional function(name, x, gout, ref) -> number or nil (x, gout: the float64 inputs of the reference):
--               result `name` is judged as |a - ref| <= t * scale instead (a result that is zero analytically,
--               judged against the size of the terms that cancel in it)
-- GPU detection and skipping: op.gpu, op.describe_gpu(name, body), op.it_gpu(name, fn).
local fa = require 'fastattn'
local H = require 'helpers.check'
local assert = require 'luassert'

-- busted's describe/it/pending live in the spec file's environment: each entry point takes its caller's
local env
local function caller_env() local e = getfenv(3); if e.it then env = e end end
local function describe(...) return env.describe(...) end
local function it(...) return env.it(...) end
local function pending(...) return env.pending(...) end

local op = { NIL = {} }
op.gpu = fa.cuda.isAvailable()
op.GPU_DTYPES = { 'float32', 'bfloat16', 'float16' }
local SKIP = 'skipped: no GPU (fa.cuda.isAvailable() is false)'

-- describe(name .. ' #gpu', body), pending where no GPU is found (run_anyway: a spec's CPU stand-in mode)
function op.describe_gpu(name, body, run_anyway)
  caller_env()
  describe(name .. ' #gpu', function()
    if op.gpu or run_anyway then body() else pending(SKIP) end
  end)
end
function op.it_gpu(name, fn)
  caller_env()
  if op.gpu then it(name, fn) else pending(name .. ' -- ' .. SKIP) end
end

local function merge(...)
  local r = {}
  for i = 1, select('#', ...) do
    for k, v in pairs(select(i, ...) or {}) do r[k] = v end
  end
  return r
end
op.merge = merge  -- the tables' fields, later ones winning (cases build their options with it)

-- what case.fixture.load returns after x and opts: the output gradient f('grad_out') and want = {out = f('out'),
-- <name> = f('grad_<name>') for each name of grads}; f(key) reads the fixture's entry key
function op.fixture_expect(f, grads)
  local want = { out = f('out') }
  for _, n in ipairs(grads) do want[n] = f('grad_' .. n) end
  return f('grad_out'), want
end

-- floating-point inputs to dtype and device (the float32_on_gpu ones stay float32 under a 16-bit dtype)
local function cast(case, x, dtype, device)
  local y = {}
  for k, v in pairs(x) do
    if fa.isTensor(v) and v:isFloatingPoint() then
      local keep = dtype ~= 'float64' and case.float32_on_gpu and case.float32_on_gpu[k]
      y[k] = v:to(keep and 'float32' or dtype, device or 'cpu')
    else
      y[k] = v
    end
  end
  return y
end

-- the tolerance of result `name` in dtype: t[dtype][name], t[dtype], t[name] or t
local function tol_of(t, dtype, name)
  local e = t[dtype] or t
  return type(e) == 'table' and e[name] or e
end

-- forward and backward; -> {out = ..., <name> = gradient ...}; b: buffers (see below) or nil
local function run(case, x, gout, opts, b)
  local r = case.backward(x, gout, b and merge(opts, b.grad) or opts)
  r.out = case.forward(x, b and merge(opts, { out = b.out }) or opts)
  return r
end

-- {out = t, grad = {grad_<name> = t}} filled with `fill`, shaped as the results r
local function buffers(case, r, fill)
  local function like(t) return fa.full(t:size(), fill, { dtype = t:dtype(), device = t:device() }) end
  local b = { out = like(r.out), grad = {} }
  for _, n in ipairs(case.grads) do b.grad['grad_' .. n] = like(r[n]) end
  return b
end

local function assert_same(a, b, what)
  for k, v in pairs(b) do
    assert(a[k]:equal(v), what .. ': ' .. k .. ' differs bit for bit')
  end
end

-- the same values in a layout that is not contiguous (dims 1 and last exchanged in memory)
local function strided(t)
  if not fa.isTensor(t) or t:dim() < 2 then return t end
  return t:transpose(1, t:dim()):contiguous():transpose(1, t:dim())
end

local function random_gout(case, x, opts)
  local out = case.forward(x, opts)
  return fa.randn(out:size(), 'float64')
end

---------------------------------------------------------------------------- fixtures
local function fixture_tests(case)
  for _, name in ipairs(case.fixture.names) do
    for _, dtype in ipairs({ 'float64', 'float32' }) do
      it(string.format('matches the PyTorch fixture %s in %s', name, dtype), function()
        local x64, opts, gout, want = case.fixture.load(name)
        local x = cast(case, x64, dtype)
        local g = gout:to(dtype)
        local r = run(case, x, g, opts)
        assert.are.equal(dtype, r.out:dtype())
        for k, ref in pairs(want) do
          local rtol, atol = unpack(tol_of(case.tol.fixture, dtype, k))
          local a, b = r[k]:double(), ref
          local m = dtype ~= 'float64' and case.mask and case.mask(x64, opts, k)
          if m then a, b = a * m, b * m end
          H.assert_close(a, b, rtol, atol, name .. ' ' .. dtype .. ' ' .. k)
        end
        if dtype ~= 'float64' then return end
        -- non-contiguous inputs give the same bits
        local xs = {}
        for k, v in pairs(x) do xs[k] = strided(v) end
        assert_same(run(case, xs, strided(g), opts), r, 'non-contiguous inputs')
        if case.convention == false then return end
        -- poisoned buffers are filled and returned; the results are those without buffers
        local b = buffers(case, r, 0 / 0)
        local rb = run(case, x, g, opts, b)
        assert.are.equal(b.out, rb.out)
        for _, n in ipairs(case.grads) do assert.are.equal(b.grad['grad_' .. n], rb[n]) end
        assert_same(rb, r, 'into buffers')
        -- grad_x = false skips x's gradient; the others are unchanged
        for _, n in ipairs(case.grads) do
          local skip = {}
          for _, m in ipairs(case.grads) do if m ~= n then skip['grad_' .. m] = false end end
          local one = case.backward(x, g, merge(opts, skip))
          assert.is_true(one[n]:equal(r[n]), n .. ' alone')
          for m in pairs(skip) do assert.is_nil(one[m:sub(6)], m .. ' = false') end
        end
      end)
    end
  end
end

---------------------------------------------------------------------------- finite differences
local function gradcheck_tests(case)
  for i, c in ipairs(case.gradcheck) do
    it(string.format('backward matches float64 finite differences (%d: %s)', i, c.what or ''), function()
      fa.manualSeed(10 + i)
      local x = case.inputs(c.shape, c.opts)
      local gout = random_gout(case, x, c.opts)
      local g = case.backward(x, gout, c.opts)
      local f = function() return case.forward(x, c.opts) end
      for _, n in ipairs(case.grads) do
        local rtol, atol = unpack(tol_of(case.tol.numgrad, 'float64', n))
        H.assert_close(g[n], H.numgrad(f, x[n], gout), rtol, atol, n .. ' vs finite differences')
        assert(H.maxabs(g[n]) > 0, n .. ' is zero everywhere: the check would be vacuous')
      end
    end)
  end
end

---------------------------------------------------------------------------- threads
local function thread_tests(case)
  it('gives bit-identical forward and backward with 1, 2 and 3 threads', function()
    local nthreads = fa.getNumThreads()
    for i, c in ipairs(case.threads) do
      fa.manualSeed(20 + i)
      local x64 = case.inputs(c.shape, c.opts)
      local g64 = random_gout(case, x64, c.opts)
      local x, g = cast(case, x64, 'float32'), g64:float()
      local res = {}
      for th = 1, 3 do
        fa.setNumThreads(th)
        local ok, r = pcall(run, case, x, g, c.opts)
        fa.setNumThreads(nthreads)
        assert(ok, r)
        res[th] = r
      end
      assert_same(res[2], res[1], 'shape ' .. i .. ', 2 threads')
      assert_same(res[3], res[1], 'shape ' .. i .. ', 3 threads')
      if case.convention ~= false then -- every element of poisoned buffers written (also when Lq or N is 0)
        assert_same(run(case, x, g, c.opts, buffers(case, res[1], 0 / 0)), res[1], 'shape ' .. i .. ', buffers')
      end
      local r64 = run(case, x64, g64, c.opts)
      for k, ref in pairs(r64) do
        local rtol, atol = unpack(tol_of(case.tol.float32, 'float32', k))
        H.assert_close(res[1][k]:double(), ref, rtol, atol, 'shape ' .. i .. ' float32 ' .. k)
      end
    end
  end)
end

---------------------------------------------------------------------------- errors
local function error_tests(case, errors)
  it('rejects bad input with the documented messages, writing nothing', function()
    if type(errors) == 'function' then errors = errors() end
    local base, bgout = errors.base()
    local like = run(case, base, bgout, nil)
    for _, e in ipairs(errors) do
      local pattern, over = e[1], e[2] or {}
      local x = {}
      for k, v in pairs(base) do x[k] = v end
      for k, v in pairs(over) do if k ~= 'opts' and k ~= 'gout' then x[k] = v ~= op.NIL and v or nil end end
      local gout = over.gout or bgout
      local function call(o)
        if e.backward then return case.backward(x, gout, o) end
        return case.forward(x, o)
      end
      local ok, msg = pcall(call, over.opts)
      msg = tostring(msg)
      assert(not ok, 'expected an error matching ' .. pattern)
      assert(msg:find(pattern), string.format('message %q does not match %q', msg, pattern))
      assert(not msg:find('lua/fastattn/', 1, true), 'raised inside the library: ' .. msg)
      if case.convention ~= false then
        -- with buffers given: still an error, and the buffers keep their values
        local b = buffers(case, like, 7)
        ok = pcall(call, merge(e.backward and b.grad or { out = b.out }, over.opts))
        assert(not ok, 'no error with buffers given: ' .. pattern)
        for k, t in pairs(merge(b.grad, { out = b.out })) do
          assert(t:equal(fa.full_like(t, 7)), k .. ' written on error: ' .. pattern)
        end
      end
    end
  end)
end

---------------------------------------------------------------------------- GPU

local function gpu_tests(case)
  local g = case.gpu
  for i, c in ipairs(g.shapes) do
    for _, dtype in ipairs(g.dtypes or op.GPU_DTYPES) do
      it(string.format('matches the CPU in %s (%d: %s)', dtype, i, c.what or ''), function()
        fa.manualSeed(30 + i)
        local x64 = case.inputs(c.shape, c.opts)
        local gout = random_gout(case, x64, c.opts):to(dtype)
        local xr = cast(case, cast(case, x64, dtype), 'float64') -- rounded to the dtype
        local ref = run(case, xr, gout:double(), c.opts)
        local x, gx = cast(case, x64, dtype, 'cuda'), gout:cuda()
        for _, var in ipairs(c.variants or g.variants) do
          local opts = merge(c.opts, var)
          local what = string.format('%s %s [%s]', c.what or i, dtype, var.name or 'default')
          opts.name = nil
          local r1 = run(case, x, gx, opts)
          local r = run(case, x, gx, opts, case.convention ~= false and buffers(case, r1, 0 / 0) or nil)
          assert.are.equal(x[case.grads[1]]:dtype(), r.out:dtype())
          for k, v in pairs(ref) do
            if k ~= 'out' then assert.are.equal(x[k]:dtype(), r[k]:dtype()) end
            local t = tol_of(case.tol.gpu, dtype, k)
            t = type(t) == 'table' and t[1] or t
            local s = g.scale and g.scale(k, xr, gout:double(), v)
            if s then
              H.assert_close(r[k]:to('float64', 'cpu'), v, 0, t * s, string.format('%s %s (against the scale %.3e)',
                             what, k, s))
            else
              H.assert_near(r[k], v, t, what .. ' ' .. k)
            end
          end
          if opts.deterministic then
            for k, v in pairs(r1) do assert(v:cpu():equal(r[k]:cpu()), what .. ': ' .. k .. ' differs run to run') end
          end
        end
      end)
    end
  end
end

function op.run(case)
  caller_env()
  if case.fixture then fixture_tests(case) end
  if case.gradcheck then gradcheck_tests(case) end
  if case.threads then thread_tests(case) end
  if case.errors then error_tests(case, case.errors) end
  if case.gpu then op.describe_gpu(case.name .. ' on CUDA', function()
    gpu_tests(case)
    if case.gpu.errors then error_tests(case, case.gpu.errors) end
  end) end
end

return op

-- fa.msda on CUDA #gpu: against the CPU op (float64, on the same 16-bit-rounded inputs) for float32, bfloat16
-- and float16 on awkward shapes, forward and all three gradients, every kernel variant (atomic backward,
-- deterministic backward, broadcast/redundant forward, persistent kernels with shared-memory levels);
-- deterministic backward bit-identical across runs;
-- errors. Skips with a message where no GPU is found.
local ffi = require 'ffi'
local fa = require 'fastattn'
local H = require 'helpers.check'

-- (pcall: another module may have declared them already)
pcall(ffi.cdef, 'int setenv(const char *name, const char *value, int overwrite);')
pcall(ffi.cdef, 'int unsetenv(const char *name);')

local has_gpu = fa.cuda.isAvailable()

-- random inputs (float32, CPU): points at least `gap` px away from integer pixel coordinates (the location
-- gradient jumps there and the GPU computes coordinates in float32)
local function random_case(N, Lq, M, D, shapes, P, opts, gap)
  gap = gap or 0.01
  local L = #shapes
  local S = 0
  for _, hw in ipairs(shapes) do S = S + hw[1] * hw[2] end
  local value = fa.randn(N, S, M, D)
  local loc = fa.empty(N, Lq, M, L, P, 2, 'float64')
  local u = fa.rand(math.max(1, N * Lq * M * L * P * 4), 'float64')
  local pl, pu = ffi.cast('double*', loc.desc.data), ffi.cast('double*', u.desc.data)
  local i = 0
  for _ = 1, N * Lq * M do
    for l = 1, L do
      for _ = 1, P do
        for axis = 0, 1 do
          local size = shapes[l][2 - axis]
          if opts.align_corners and size == 1 then
            pl[i] = pu[2 * i]
          else
            local k = math.floor(pu[2 * i] * (size + 1.4)) - 1.2 -- cells -2 .. size-1: some fully outside
            local x = math.floor(k) + gap + (1 - 2 * gap) * pu[2 * i + 1]
            pl[i] = opts.align_corners and x / (size - 1) or (x + 0.5) / size
          end
          i = i + 1
        end
      end
    end
  end
  local attn = fa.rand(N, Lq, M, L, P)
  local pa = ffi.cast('float*', attn.desc.data)
  for k = 3, attn:numel() - 1, 7 do pa[k] = 0 end -- attention 0 still has an attention gradient
  local gout = fa.randn(N, Lq, M * D)
  return value, loc:float(), attn, gout
end

local function maxabs(t) return fa.maxAbsDiff(t, fa.zeros_like(t)) end

-- |a - ref| <= tol * max|ref| + rtol * |ref|
local function close(a, ref, tol, what)
  local m = maxabs(ref)
  H.assert_close(a:to('float64', 'cpu'), ref, tol, tol * math.max(m, 1e-30), what)
end

local TOL = { float32 = 2e-5, bfloat16 = 1e-2, float16 = 2e-3 }

-- runs the GPU op (dtype) and the float64 CPU op on the same rounded inputs; compares everything
local function check_case(name, dtype, N, Lq, M, D, shapes, P, opts, variants, clustered)
  local value, loc, attn, gout = random_case(N, Lq, M, D, shapes, P, opts)
  if clustered then -- every query and head samples where query 1, head 1 does: the warp merge path runs (and
    -- must not merge different heads, whose grad_value rows differ)
    local q1 = loc:narrow(2, 1, 1):narrow(3, 1, 1):contiguous()
    loc = q1:expand(N, Lq, M, #shapes, P, 2):contiguous()
  end
  local v16, g16 = value:to(dtype), gout:to(dtype)
  local ref_out = fa.msda(v16:double(), shapes, nil, loc:double(), attn:double(), opts)
  local rgv, rgl, rga = fa.msda_backward(g16:double(), v16:double(), shapes, nil, loc:double(), attn:double(), opts)
  local vc, lc, ac, gc = v16:cuda(), loc:cuda(), attn:cuda(), g16:cuda()
  local tol = TOL[dtype]
  for _, var in ipairs(variants) do
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.deterministic = var.det
    for env, val in pairs({ FA_MSDA_FWD = var.fwd, FA_MSDA_BWD = var.bwd, FA_MSDA_ORDER = var.order,
                            FA_MSDA_MERGE = var.merge, FA_MSDA_SMEM = var.smem, FA_MSDA_FSMEM = var.fsmem,
                            FA_MSDA_SMEM_ALWAYS = var.always }) do
      ffi.C.setenv(env, val, 1)
    end
    -- poisoned outputs: every element must be written
    o.out = fa.full({ N, Lq, M * D }, 0 / 0, { dtype = dtype, device = 'cuda' })
    o.grad_value = fa.full(vc:size(), 0 / 0, { dtype = dtype, device = 'cuda' })
    o.grad_sampling_locations = fa.full(lc:size(), 0 / 0, { dtype = 'float32', device = 'cuda' })
    o.grad_attention_weights = fa.full(ac:size(), 0 / 0, { dtype = 'float32', device = 'cuda' })
    local out = fa.msda(vc, shapes, nil, lc, ac, o)
    local gv, gl, ga = fa.msda_backward(gc, vc, shapes, nil, lc, ac, o)
    for _, env in ipairs({ 'FA_MSDA_FWD', 'FA_MSDA_BWD', 'FA_MSDA_ORDER', 'FA_MSDA_MERGE', 'FA_MSDA_SMEM',
                           'FA_MSDA_FSMEM', 'FA_MSDA_SMEM_ALWAYS' }) do
      ffi.C.unsetenv(env)
    end
    local what = string.format('%s %s [%s]', name, dtype, var.name)
    assert.are.equal(dtype, out:dtype())
    assert.are.equal(dtype, gv:dtype())
    close(out, ref_out, tol, what .. ' out')
    close(gv, rgv, tol, what .. ' grad_value')
    -- the point gradients are float32 sums over channels of exact products of the rounded inputs
    close(gl, rgl, dtype == 'float32' and 1e-4 or 2e-4, what .. ' grad_sampling_locations')
    close(ga, rga, dtype == 'float32' and 1e-5 or 1e-4, what .. ' grad_attention_weights')
  end
end

local VARIANTS = {
  { name = 'default' },
  { name = 'deterministic', det = true },
  { name = 'gather env', bwd = 'gather' },
  { name = 'redundant fwd', fwd = 'redundant' },
  { name = '(n,q,m) order', order = 'mq', merge = '0' },
  { name = '(n,m,q) order', order = 'qm', merge = '0' },
  { name = 'warp merge, (n,m,q) order', merge = '1', order = 'qm' },
  { name = 'warp merge, (n,q,m) order', merge = '1', order = 'mq' },
  -- persistent kernels with the coarse levels in shared memory (off by default; forced on here whatever
  -- the size); 2 KB holds only the smallest level(s), the others take the global path
  { name = 'shared-memory levels (all that fit)', smem = '200', fsmem = '200', always = '1' },
  { name = 'shared-memory levels (2 KB) + warp merge', smem = '2', fsmem = '2', always = '1', merge = '1' },
}

describe('fa.msda on CUDA #gpu', function()
  if not has_gpu then
    it('skips: no GPU found (fa.cuda.isAvailable() is false)', function()
      print('msda_gpu_spec: no GPU, skipped')
    end)
    return
  end

  for _, dtype in ipairs({ 'float32', 'bfloat16', 'float16' }) do
    it('matches the CPU with levels of 1x1, odd sizes, Lq=1, N=3: ' .. dtype, function()
      fa.manualSeed(1)
      check_case('1x1', dtype, 3, 1, 3, 32, { { 1, 1 }, { 3, 5 }, { 7, 2 } }, 3, {}, VARIANTS)
    end)
    for _, D in ipairs({ 4, 8, 32, 64, 128, 6, 24, 40, 256 }) do
      it(string.format('matches the CPU for D=%d: %s', D, dtype), function()
        fa.manualSeed(100 + D)
        check_case('D' .. D, dtype, 2, 37, 2, D, { { 5, 7 }, { 1, 1 }, { 2, 3 } }, 4, {}, VARIANTS)
      end)
    end
    for _, mode in ipairs({ { 'zeros', true }, { 'border', false }, { 'border', true } }) do
      it(string.format('matches the CPU with padding=%s, align_corners=%s: %s', mode[1], tostring(mode[2]), dtype),
        function()
          fa.manualSeed(7)
          check_case(mode[1], dtype, 2, 19, 3, 16, { { 6, 9 }, { 3, 4 }, { 1, 2 } }, 3,
            { padding = mode[1], align_corners = mode[2] }, VARIANTS)
        end)
    end
    it('matches the CPU on an encoder-like shape (many points per pixel): ' .. dtype, function()
      fa.manualSeed(3)
      check_case('enc-like', dtype, 2, 300, 8, 32, { { 20, 30 }, { 10, 15 }, { 5, 8 }, { 3, 4 } }, 4, {}, VARIANTS)
    end)
    it('matches the CPU when the queries are the value pixels (Lq = S, encoder self-attention): ' .. dtype, function()
      fa.manualSeed(5)
      check_case('self', dtype, 2, 36, 4, 32, { { 5, 6 }, { 2, 3 } }, 4, {}, VARIANTS)
      check_case('self clustered', dtype, 1, 36, 2, 16, { { 5, 6 }, { 2, 3 } }, 2, {}, VARIANTS, true)
    end)
    it('matches the CPU when queries share their sampling locations (atomics merged in the warp): ' .. dtype, function()
      fa.manualSeed(4)
      for _, D in ipairs({ 32, 8, 64 }) do
        check_case('clustered D' .. D, dtype, 2, 45, 3, D, { { 6, 7 }, { 2, 3 }, { 1, 1 } }, 3, {}, VARIANTS, true)
        check_case('clustered border D' .. D, dtype, 1, 33, 2, D, { { 6, 7 }, { 2, 3 } }, 2,
          { padding = 'border', align_corners = true }, VARIANTS, true)
      end
    end)
  end

  it('gives a bit-identical deterministic backward across runs', function()
    fa.manualSeed(9)
    local shapes = { { 20, 30 }, { 10, 15 }, { 5, 8 }, { 3, 4 } }
    for _, dtype in ipairs({ 'float32', 'bfloat16', 'float16' }) do
      local value, loc, attn, gout = random_case(2, 500, 8, 32, shapes, 4, {})
      local vc, lc, ac, gc = value:to(dtype):cuda(), loc:cuda(), attn:cuda(), gout:to(dtype):cuda()
      local r = {}
      for k = 1, 2 do r[k] = { fa.msda_backward(gc, vc, shapes, nil, lc, ac, { deterministic = true }) } end
      for j = 1, 3 do assert.is_true(r[1][j]:cpu():equal(r[2][j]:cpu()), dtype .. ' gradient ' .. j) end
    end
  end)

  it('handles Lq = 0, N = 0 and non-contiguous inputs', function()
    local shapes = { { 2, 3 }, { 1, 1 } }
    local value = fa.randn(2, 7, 2, 4):cuda()
    local loc, attn = fa.rand(2, 0, 2, 2, 3, 2):cuda(), fa.rand(2, 0, 2, 2, 3):cuda()
    assert.are.same({ 2, 0, 8 }, fa.msda(value, shapes, nil, loc, attn):size())
    local gv = fa.msda_backward(fa.empty(2, 0, 8):cuda(), value, shapes, nil, loc, attn,
      { grad_value = fa.full({ 2, 7, 2, 4 }, 3, { device = 'cuda' }) })
    assert.is_true(gv:cpu():equal(fa.zeros(2, 7, 2, 4)))
    local out0 = fa.msda(fa.randn(0, 7, 2, 4):cuda(), shapes, nil, fa.rand(0, 5, 2, 2, 3, 2):cuda(),
      fa.rand(0, 5, 2, 2, 3):cuda())
    assert.are.same({ 0, 5, 8 }, out0:size())
    -- non-contiguous GPU inputs give what their contiguous copies give
    local v, l, a = random_case(2, 9, 2, 8, shapes, 2, {})
    local vt = v:cuda():transpose(1, 2):contiguous():transpose(1, 2)
    assert.is_false(vt:isContiguous())
    assert.is_true(fa.msda(vt, shapes, nil, l:cuda(), a:cuda()):cpu():equal(fa.msda(v:cuda(), shapes, nil, l:cuda(), a:cuda()):cpu()))
    -- shapes given as CUDA tensors are copied to the host
    local sh = fa.tensor(shapes, 'int64'):cuda()
    assert.is_true(fa.msda(v:cuda(), sh, nil, l:cuda(), a:cuda()):cpu():equal(fa.msda(v:cuda(), shapes, nil, l:cuda(), a:cuda()):cpu()))
  end)

  it('reports mixed devices, 16-bit locations, float64 values and too many levels', function()
    local shapes = { { 2, 3 }, { 1, 1 } }
    local v, l, a = random_case(1, 3, 2, 4, shapes, 2, {})
    local function err(pattern, ...)
      local ok, msg = pcall(fa.msda, ...)
      assert.is_false(ok)
      assert.is_truthy(tostring(msg):find(pattern, 1, true), tostring(msg))
    end
    err("fa.msda: argument 'sampling_locations': expected a tensor on cuda:0 (as 'value'), got one on cpu",
      v:cuda(), shapes, nil, l, a:cuda())
    err("fa.msda: argument 'attention_weights': expected a tensor on cuda:0 (as 'value'), got one on cpu",
      v:cuda(), shapes, nil, l:cuda(), a)
    err("argument 'sampling_locations': expected dtype float32, got bfloat16", v:bfloat16():cuda(), shapes, nil,
      l:bfloat16():cuda(), a:cuda())
    err("argument 'value': expected float32, bfloat16 or float16 on CUDA, got float64", v:double():cuda(), shapes,
      nil, l:double():cuda(), a:double():cuda())
    local many = {}
    for i = 1, 17 do many[i] = { 1, 1 } end
    err("at most 16 levels on CUDA, got 17", fa.randn(1, 17, 1, 4):cuda(), many, nil,
      fa.rand(1, 2, 1, 17, 1, 2):cuda(), fa.rand(1, 2, 1, 17, 1):cuda())
    local ok, msg = pcall(fa.msda_backward, fa.randn(1, 3, 8), v:cuda(), shapes, nil, l:cuda(), a:cuda())
    assert.is_false(ok)
    assert.is_truthy(msg:find("fa.msda_backward: argument 'grad_out': expected a tensor on cuda:0 (as 'value'), got one on cpu", 1, true), msg)
  end)
end)

-- fa_mse_* and fa_cross_entropy_* (CPU) against PyTorch's F.mse_loss / F.cross_entropy
-- (spec/fixtures/gen_nnops.py: ignore_index, label smoothing 0.1, every reduction) and float64 finite
-- differences.
local fa = require 'fastattn'
local H = require 'helpers.check'
local C = fa.C

local F = H.fixture('nnops')
local RED = { none = C.FA_REDUCE_NONE, mean = C.FA_REDUCE_MEAN, sum = C.FA_REDUCE_SUM }
local REDUCTIONS = { 'none', 'mean', 'sum' }

local function loss_shape(ref, red) return red == 'none' and ref:size() or { 1 } end

local function ce_forward(x, t, ii, ls, red, loss)
  loss = loss or fa.empty(loss_shape(t, red), x:dtype())
  fa.check(C.fa_cross_entropy_forward(loss.desc, x.desc, t.desc, ii, ls, RED[red]))
  return loss
end
local function ce_backward(gl, x, t, ii, ls, red, gx)
  gx = gx or fa.empty_like(x)
  fa.check(C.fa_cross_entropy_backward(gx.desc, gl.desc, x.desc, t.desc, ii, ls, RED[red]))
  return gx
end
local function mse_forward(x, t, red)
  local loss = fa.empty(loss_shape(x, red), x:dtype())
  fa.check(C.fa_mse_forward(loss.desc, x.desc, t.desc, RED[red]))
  return loss
end
local function mse_backward(gl, x, t, red)
  local gx = fa.empty_like(x)
  fa.check(C.fa_mse_backward(gx.desc, gl.desc, x.desc, t.desc, RED[red]))
  return gx
end

local err_of = H.err_of

local CE = { ce2d = -100, ce4d = 2 } -- fixture name -> ignore_index

describe('fa_cross_entropy', function()
  for name, ii in pairs(CE) do
    for _, ls in ipairs({ 0, 0.1 }) do
      for _, red in ipairs(REDUCTIONS) do
        for _, dt in ipairs({ 'float64', 'float32' }) do
          local rtol, atol = 1e-11, 1e-13
          if dt == 'float32' then rtol, atol = 1e-5, 1e-6 end
          it(('%s, label_smoothing %g, reduction %s matches PyTorch (%s)'):format(name, ls, red, dt), function()
            local tag = ('%s_ls%d_%s'):format(name, math.floor(ls * 10 + 0.5), red)
            local x, t = F[name .. '_x']:to(dt), F[name .. '_t']
            H.assert_close(ce_forward(x, t, ii, ls, red), F[tag .. '_loss']:to(dt), rtol, atol, 'loss')
            local gx = ce_backward(F[tag .. '_gout']:to(dt), x, t, ii, ls, red)
            H.assert_close(gx, F[tag .. '_gx']:to(dt), rtol, atol, 'grad_logits')
          end)
        end
      end
    end
  end

  it('takes non-contiguous logits, targets, losses and gradients', function()
    local x = fa.empty(3, 3, 4, 2, 'float64'):permute(4, 3, 1, 2):copy(F.ce4d_x) -- (2, 4, 3, 3)
    local t = fa.empty(3, 3, 2, 'int64'):permute(3, 2, 1):copy(F.ce4d_t) -- (2, 3, 3)
    assert.is_false(x:isContiguous())
    assert.is_false(t:isContiguous())
    for _, red in ipairs(REDUCTIONS) do
      local tag = 'ce4d_ls1_' .. red
      local loss = red == 'none' and fa.zeros(3, 3, 2, 'float64'):permute(3, 2, 1) or nil
      loss = ce_forward(x, t, 2, 0.1, red, loss)
      H.assert_close(loss, F[tag .. '_loss'], 1e-11, 1e-13, 'loss ' .. red)
      local gl = F[tag .. '_gout']
      if red == 'none' then gl = fa.empty(3, 3, 2, 'float64'):permute(3, 2, 1):copy(gl) end
      local gx = fa.zeros(2, 3, 3, 4, 'float64'):permute(1, 4, 2, 3)
      ce_backward(gl, x, t, 2, 0.1, red, gx)
      H.assert_close(gx, F[tag .. '_gx'], 1e-11, 1e-13, 'grad_logits ' .. red)
    end
  end)

  it('has the gradients of float64 finite differences', function()
    fa.manualSeed(9)
    local x = fa.randn(2, 4, 3, 3, 'float64')
    local t = F.ce4d_t
    for _, ls in ipairs({ 0, 0.1 }) do
      for _, red in ipairs(REDUCTIONS) do
        local gout = red == 'none' and fa.randn(2, 3, 3, 'float64') or fa.tensor({ 1.3 }, 'float64')
        local f = function() return ce_forward(x, t, 2, ls, red) end
        H.assert_close(ce_backward(gout, x, t, 2, ls, red), H.numgrad(f, x, gout), 1e-6, 1e-8,
          ('ls %g %s'):format(ls, red))
      end
    end
  end)

  it('gives NaN for a mean over only ignored targets, as PyTorch', function()
    local x = fa.randn(3, 4)
    local t = fa.tensor({ -100, -100, -100 }, 'int64')
    local l = ce_forward(x, t, -100, 0, 'mean'):item()
    assert.is_true(l ~= l)
    assert.are.equal(0, ce_forward(x, t, -100, 0, 'sum'):item())
  end)

  it('rejects bad arguments with messages naming them', function()
    local x = fa.randn(7, 5)
    local e = err_of(function() ce_forward(x, fa.zeros(7, 'int32'), -100, 0, 'mean') end)
    assert.truthy(e:find("fa_cross_entropy_forward: argument 'target': expected dtype int64 (class indices), got int32", 1, true), e)
    e = err_of(function() ce_forward(x, fa.tensor({ 0, 1, 2, 3, 4, 5, 0 }, 'int64'), -100, 0, 'mean') end)
    assert.truthy(e:find("argument 'target': class index 5 at position 5 is out of range [0, 5) (ignore_index -100)", 1, true), e)
    e = err_of(function() ce_forward(x, fa.tensor({ 0, 1, 2, -1, 4, 1, 0 }, 'int64'), -100, 0, 'none') end)
    assert.truthy(e:find("class index -1 at position 3 is out of range", 1, true), e)
    e = err_of(function()
      ce_backward(fa.ones(1), x, fa.tensor({ 0, 1, 2, 3, 9, 1, 0 }, 'int64'), -100, 0, 'sum')
    end)
    assert.truthy(e:find("fa_cross_entropy_backward: argument 'target': class index 9", 1, true), e)
    e = err_of(function() ce_forward(x, fa.zeros(6, 'int64'), -100, 0, 'mean') end)
    assert.truthy(e:find("argument 'target': expected shape (N, d1, ...) matching 'logits' of shape (7, 5)", 1, true), e)
    e = err_of(function() ce_forward(x, fa.zeros(7, 'int64'), -100, 1.5, 'mean') end)
    assert.truthy(e:find("argument 'label_smoothing'", 1, true), e)
    e = err_of(function() ce_forward(x, fa.zeros(7, 'int64'), -100, 0, 'mean', fa.empty(7)) end)
    assert.truthy(e:find("argument 'loss': expected one element (reduction mean), got shape (7,)", 1, true), e)
    e = err_of(function()
      local l = fa.empty(1)
      local t0 = fa.zeros(7, 'int64')
      fa.check(C.fa_cross_entropy_forward(l.desc, x.desc, t0.desc, -100, 0, 3))
    end)
    assert.truthy(e:find("argument 'reduction'", 1, true), e)
    e = err_of(function() ce_forward(fa.randn(7), fa.zeros(7, 'int64'), -100, 0, 'mean') end)
    assert.truthy(e:find("argument 'logits': expected (N, C) or (N, C, d1, ...)", 1, true), e)
  end)
end)

describe('fa_mse', function()
  for _, red in ipairs(REDUCTIONS) do
    for _, dt in ipairs({ 'float64', 'float32' }) do
      local rtol, atol = 1e-12, 1e-14
      if dt == 'float32' then rtol, atol = 1e-5, 1e-6 end
      it(('reduction %s matches PyTorch (%s)'):format(red, dt), function()
        local x, t = F.mse_x:to(dt), F.mse_t:to(dt)
        H.assert_close(mse_forward(x, t, red), F['mse_' .. red .. '_loss']:to(dt), rtol, atol, 'loss')
        H.assert_close(mse_backward(F['mse_' .. red .. '_gout']:to(dt), x, t, red), F['mse_' .. red .. '_gx']:to(dt), rtol,
          atol, 'grad_x')
      end)
    end
    it(('reduction %s takes non-contiguous tensors and has finite-difference gradients'):format(red), function()
      local x = fa.empty(5, 4, 3, 'float64'):permute(3, 2, 1):copy(F.mse_x)
      local t = fa.empty(5, 4, 3, 'float64'):permute(3, 2, 1):copy(F.mse_t)
      H.assert_close(mse_forward(x, t, red), F['mse_' .. red .. '_loss'], 1e-12, 1e-14, 'loss')
      local gout = F['mse_' .. red .. '_gout']
      H.assert_close(mse_backward(gout, x, t, red), F['mse_' .. red .. '_gx'], 1e-12, 1e-14, 'grad_x')
      local xc = x:contiguous() -- H.numgrad perturbs a contiguous tensor
      local f = function() return mse_forward(xc, t, red) end
      H.assert_close(mse_backward(gout, xc, t, red), H.numgrad(f, xc, gout), 1e-6, 1e-8, 'finite differences')
    end)
  end

  it('sums large inputs the same way with 1 and 2 threads', function()
    local nthreads = fa.getNumThreads()
    fa.manualSeed(2)
    local x, t = fa.randn(100003), fa.randn(100003)
    fa.setNumThreads(1)
    local a = mse_forward(x, t, 'mean'):item()
    fa.setNumThreads(2)
    local b = mse_forward(x, t, 'mean'):item()
    fa.setNumThreads(nthreads)
    assert.are.equal(a, b)
    assert.is_true(math.abs(a - 2) < 0.05, 'mean of (x - t)^2 for two standard normals: ' .. a)
  end)

  it('rejects bad arguments with messages naming them', function()
    local x = fa.randn(3, 4)
    local e = err_of(function() mse_forward(x, fa.randn(4, 3), 'mean') end)
    assert.truthy(e:find("fa_mse_forward: argument 'target': expected shape (3, 4)", 1, true), e)
    e = err_of(function() mse_forward(x, fa.randn(3, 4, 'float64'), 'sum') end)
    assert.truthy(e:find("argument 'target': expected dtype float32 (as 'x'), got float64", 1, true), e)
    e = err_of(function() mse_backward(fa.ones(2), x, fa.randn(3, 4), 'mean') end)
    assert.truthy(e:find("fa_mse_backward: argument 'grad_loss': expected one element", 1, true), e)
  end)
end)

-- the Lua layer (fa.F.cross_entropy, nn.CrossEntropyCriterion): 1-based classes, reported as the user gave them
describe('class targets in the user\'s terms', function()
  local nn, FF = fa.nn, fa.F
  local function q(m) return (m:gsub('[%^%$%(%)%%%.%[%]%*%+%-%?]', '%%%0')) end
  local function msg_of(f)
    local ok, e = pcall(f)
    assert.is_false(ok, 'expected an error')
    return tostring(e)
  end
  local function is(e, want)
    -- ('a int64': fa.errors' article; 'an int64' accepted too)
    local pat = '^spec/criterion_spec%.lua:%d+: ' .. q(want):gsub('got a int', 'got an? int') .. '$'
    assert.truthy(e:find(pat), string.format('\n got:  %s\n want: %s', e, pat))
  end
  local x = fa.randn(2, 3)

  it('a bad label: the label as given, its 1-based position, 1..C, the ignore index as given', function()
    is(msg_of(function() nn.CrossEntropyCriterion():forward(x, fa.tensor({ 0, 1 }, 'int64')) end),
       "fa.nn.CrossEntropyCriterion:forward: argument 'target': class 0 at position 1 is out of range 1..3 (ignore_index -100)")
    is(msg_of(function() nn.CrossEntropyCriterion { ignore_index = 7 }:forward(x, fa.tensor({ 1, 4 }, 'int64')) end),
       "fa.nn.CrossEntropyCriterion:forward: argument 'target': class 4 at position 2 is out of range 1..3 (ignore_index 7)")
    is(msg_of(function() FF.cross_entropy(x, fa.tensor({ 3, -1 }, 'int64')) end),
       "fa.F.cross_entropy: argument 'target': class -1 at position 2 is out of range 1..3 (ignore_index -100)")
    -- (N, C, d1) logits: the position counts the targets in order
    is(msg_of(function() FF.cross_entropy(fa.randn(2, 3, 2), fa.tensor({ { 1, 2 }, { 3, 5 } }, 'int64')) end),
       "fa.F.cross_entropy: argument 'target': class 5 at position 4 is out of range 1..3 (ignore_index -100)")
    local ce = nn.CrossEntropyCriterion()
    ce:forward(x, fa.tensor({ 1, 2 }, 'int64'))
    is(msg_of(function() ce:backward(x, fa.tensor({ 1, 9 }, 'int64')) end),
       "fa.nn.CrossEntropyCriterion:backward: argument 'target': class 9 at position 2 is out of range 1..3 (ignore_index -100)")
    is(msg_of(function() FF.cross_entropy_backward(nil, x, fa.tensor({ 1, 0 }, 'int64')) end),
       "fa.F.cross_entropy_backward: argument 'target': class 0 at position 2 is out of range 1..3 (ignore_index -100)")
  end)

  it('targets that are fractional, NaN, of the wrong size or dtype are errors', function()
    is(msg_of(function() nn.CrossEntropyCriterion():forward(x, fa.tensor({ 1.5, 1 })) end),
       "fa.nn.CrossEntropyCriterion:forward: argument 'target': expected an int64 tensor of class indices (1-based), got a float32 tensor of size 2")
    is(msg_of(function() FF.cross_entropy(x, fa.tensor({ 0 / 0, 1 }, 'float64')) end),
       "fa.F.cross_entropy: argument 'target': expected an int64 tensor of class indices (1-based), got a float64 tensor of size 2")
    is(msg_of(function() FF.cross_entropy(x, fa.tensor({ 1, 2, 3 }, 'int64')) end),
       "fa.F.cross_entropy: argument 'target': expected a tensor of size 2 (the input's size without the class dim), got an int64 tensor of size 3")
    is(msg_of(function() FF.cross_entropy(x, fa.tensor({ 1, 2 }, 'int32')) end),
       "fa.F.cross_entropy: argument 'target': expected an int64 tensor of class indices (1-based), got a int32 tensor of size 2")
    is(msg_of(function() FF.cross_entropy(x, { 1, 2 }) end),
       "fa.F.cross_entropy: argument 'target': expected a tensor, got a table")
    is(msg_of(function() nn.CrossEntropyCriterion { ignore_index = 1.5 } end),
       "fa.nn.CrossEntropyCriterion: argument 'ignore_index': expected an integer, got 1.5")
    is(msg_of(function() nn.CrossEntropyCriterion { label_smoothing = 2 } end),
       "fa.nn.CrossEntropyCriterion: argument 'label_smoothing': expected a number in [0, 1], got 2")
    is(msg_of(function() nn.CrossEntropyCriterion { ignore = 1 } end),
       'fa.nn.CrossEntropyCriterion: argument \'opts\': unknown option "ignore" (known: ignore_index, label_smoothing, reduction)')
    is(msg_of(function() FF.cross_entropy(x:long(), fa.tensor({ 1, 2 }, 'int64')) end),
       "fa.F.cross_entropy: argument 'input': expected a floating-point tensor of logits, got an int64 tensor of size 2x3")
  end)

  it('ignore_index is compared with the 1-based targets as given', function()
    local xd = fa.randn(3, 4):double()
    local lsm = fa.F.log_softmax(xd, 2)
    -- ignore class 2 (a valid 1-based class): rows 1 and 3 count, row 2 is ignored
    local t = fa.tensor({ 4, 2, 1 }, 'int64')
    local loss = FF.cross_entropy(xd, t, { ignore_index = 2 }):item()
    assert.is_near(-(lsm[1][4] + lsm[3][1]) / 2, loss, 1e-12)
    local crit = nn.CrossEntropyCriterion { ignore_index = 2, reduction = 'none' }
    local l = crit:forward(xd, t)
    assert.are.equal(0, l[2])
    assert.is_near(-lsm[1][4], l[1], 1e-12)
    -- the default -100 as a target is ignored, not reported
    assert.is_near(-lsm[3][1] / 1, FF.cross_entropy(xd, fa.tensor({ -100, -100, 1 }, 'int64')):item(), 1e-12)
  end)
end)

-- module.lua: the class helper and nn.Module, the base of every layer.
--
-- A module registers its parameters (registerParameter: the tensor in self[name], its gradient in
-- self['grad' .. Name], e.g. weight/gradWeight), its persistent buffers (registerBuffer: saved in the
-- state dict) and its children (registerModule: self[name]). Names in namedParameters()/stateDict() are
-- PyTorch's state_dict names: 'weight', 'bias', 'child.weight', '0.weight' inside a Sequential.
local ffi = require 'ffi'
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local E = require 'fastattn.errors'
local C = fa.C

---------------------------------------------------------------------------- classes
-- nn.class('Name', parent): a class table; calling it (nn.Name(...)) makes an instance and runs __init.
-- Instances print with __tostring__ and are callable (m(x) = m:forward(x)).
function nn.class(name, parent)
  local cls = {}
  cls.__index = cls
  cls.__typename = 'nn.' .. name
  -- the names messages give the methods ('fa.nn.Linear:forward'), as the user called them: updateGradInput
  -- and accGradParameters report their own names, or backward's when backward called them (nn._as)
  cls.__fnForward, cls.__fnBackward = 'fa.nn.' .. name .. ':forward', 'fa.nn.' .. name .. ':backward'
  cls.__fnUpdateGradInput = 'fa.nn.' .. name .. ':updateGradInput'
  cls.__fnAccGradParameters = 'fa.nn.' .. name .. ':accGradParameters'
  cls.__call = function(self, ...) return self:forward(...) end
  cls.__tostring = function(self) return self:__tostring__() end
  setmetatable(cls, {
    __index = parent,
    __call = function(c, ...)
      local o = setmetatable({}, c)
      o:__init(...)
      return o
    end,
    __tostring = function() return 'nn.' .. name end,
  })
  nn[name] = cls
  return cls, parent
end

-- the Torch-style type name of a module ('nn.Linear'), nil for anything else
function nn.typename(m)
  local mt = type(m) == 'table' and getmetatable(m)
  return mt and rawget(mt, '__typename') or nil
end
function nn.isModule(m)
  return type(m) == 'table' and nn.typename(m) ~= nil and type(m.forward) == 'function'
end

---------------------------------------------------------------------------- helpers shared by the modules
-- nn._as(self, fn, f, ...): f(self, ...) with the module's updateGradInput and accGradParameters reporting
-- their errors under fn (backward runs them for the user, who called backward)
function nn._as(self, fn, f, ...)
  if rawget(self, '__fnUpdateGradInput') ~= nil then return f(self, ...) end -- already inside a call that named them
  rawset(self, '__fnUpdateGradInput', fn)
  rawset(self, '__fnAccGradParameters', fn)
  local res = { pcall(f, self, ...) }
  rawset(self, '__fnUpdateGradInput', nil)
  rawset(self, '__fnAccGradParameters', nil)
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2, table.maxn(res))
end

-- a parameter tensor of `shape` for constructor fn: a size that cannot be allocated is reported under fn,
-- naming the arguments it comes from (args: a list of names)
function nn._param(fn, shape, args)
  local n = 1
  for _, v in ipairs(shape) do n = n * v end
  local ok, t = false, nil
  if n < 2 ^ 53 then ok, t = pcall(fa.empty, shape) end -- (fa.empty refuses what memory and swap cannot hold)
  if not ok then
    local q = {}
    for i, a in ipairs(args) do q[i] = "'" .. a .. "'" end
    E.fail(fn, "argument%s %s: a parameter of size %s (%s elements) is too large to allocate", #q > 1 and 's' or '',
           table.concat(q, ', '), table.concat(shape, 'x'),
           n < 2 ^ 53 and string.format('%d', n) or string.format('%.4g', n))
  end
  return t
end

-- checks a backward's gradOutput: a tensor of `like`'s dtype and device and of size `shape` (a table;
-- what: how that size is named, e.g. "the output's")
function nn._checkGradOutput(fn, gradOutput, like, shape, what)
  E.tensor(fn, 'gradOutput', gradOutput)
  if gradOutput.desc.dtype ~= like.desc.dtype or gradOutput.desc.device ~= like.desc.device
     or not nn._hasSize(gradOutput, shape) then
    E.arg(fn, 'gradOutput', string.format('a %s tensor%s of size %s (%s)', like:dtype(),
          like.desc.device >= 0 and (' on ' .. like:device()) or '', #shape == 0 and '[]' or table.concat(shape, 'x'),
          what or "the output's"), gradOutput)
  end
  return gradOutput
end
-- buffer(t, shape, like): t resized to shape with like's dtype and device (or `dtype`, `device`), reusing
-- its storage when it can; a new tensor otherwise. Modules keep output/gradInput through this.
function nn._buffer(t, shape, dtype, device)
  if fa.isTensor(dtype) then dtype, device = dtype.desc.dtype, dtype.desc.device end
  if t ~= nil and fa.isTensor(t) and t.desc.dtype == dtype and t.desc.device == device then
    return t:resize(shape)
  end
  return fa.empty(shape, { dtype = dtype, device = device })
end

-- scales gradOutput when scale ~= 1 (into a kept buffer)
function nn._scaled(self, gradOutput, scale)
  if scale == nil or scale == 1 then return gradOutput end
  E.number(self.__fnAccGradParameters, 'scale', scale)
  E.tensor(self.__fnAccGradParameters, 'gradOutput', gradOutput)
  self._scaledGrad = nn._buffer(self._scaledGrad, gradOutput:size(), gradOutput)
  return self._scaledGrad:copy(gradOutput):scale_(scale)
end

-- E.opts for a constructor's table form, whose first `npos` array entries may stand for the positional
-- arguments; returns t
function nn._opts(fn, t, known, npos)
  local named = {}
  for k, v in pairs(t) do
    if not (type(k) == 'number' and k >= 1 and k <= npos and k == math.floor(k)) then named[k] = v end
  end
  E.opts(fn, 'opts', named, known)
  return t
end

-- whether tensor t has size `shape` (a table)
function nn._hasSize(t, shape)
  if t:dim() ~= #shape then return false end
  for i = 1, #shape do if t:size(i) ~= shape[i] then return false end end
  return true
end

-- checks a module's tensor argument: a tensor; with `like` (one of the module's parameters), of its
-- dtype and on its device
function nn._checkInput(fn, name, x, like)
  E.tensor(fn, name, x)
  if like ~= nil then
    if x.desc.dtype ~= like.desc.dtype then
      E.arg(fn, name, string.format("a %s tensor (the module's dtype)", like:dtype()), x)
    end
    if x.desc.device ~= like.desc.device then
      E.arg(fn, name, string.format("a tensor on %s (the module's device)", like:device()), x)
    end
  end
  return x
end

-- t itself when contiguous, else a contiguous copy in the kept buffer self[key] (for C entries that need
-- contiguous tensors; no allocation in a steady loop)
function nn._contiguous(self, key, t)
  if t:isContiguous() then return t end
  self[key] = nn._buffer(self[key], t:size(), t)
  return self[key]:copy(t)
end

---------------------------------------------------------------------------- nn.Module
local Module = nn.class('Module')

function Module:__init()
  self.train = true
  self._paramNames = {}   -- registration order
  self._bufferNames = {}
  self._childNames = {}
end

function Module:__tostring__() return nn.typename(self) or 'nn.Module' end

-- registerParameter(name, tensor[, gradName]): self[name] = tensor, self[gradName] = zeros like it
-- (gradName defaults to 'grad' .. Name: weight -> gradWeight). A nil tensor registers nothing.
function Module:registerParameter(name, t, gradName)
  if t == nil then self[name] = nil; return end
  gradName = gradName or ('grad' .. name:sub(1, 1):upper() .. name:sub(2))
  self[name] = t
  self[gradName] = fa.zeros_like(t)
  self._paramNames[#self._paramNames + 1] = { name, gradName }
  return t
end
-- registerBuffer(name, tensor, persistent = true): a tensor that moves with type()/cuda() and, when
-- persistent, is part of the state dict (as PyTorch's running statistics)
function Module:registerBuffer(name, t, persistent)
  self[name] = t
  self._bufferNames[#self._bufferNames + 1] = { name, persistent ~= false }
  return t
end
-- registerModule(name, m): a child module in self[name]; its parameters are named 'name.<...>'
function Module:registerModule(name, m)
  self[name] = m
  self._childNames[#self._childNames + 1] = name
  return m
end

-- the children as an ordered list of {name, module}
function Module:namedChildren()
  local out = {}
  for _, name in ipairs(self._childNames or {}) do
    if self[name] ~= nil then out[#out + 1] = { name, self[name] } end
  end
  return out
end

---------------------------------------------------------------------------- forward / backward
-- nn.Module is abstract: a module class implements updateOutput and updateGradInput (accGradParameters
-- only when it has parameters)
function Module:updateOutput(input)
  E.fail(self.__fnForward, '%s is abstract: a module class must implement updateOutput (this one has none)',
         nn.typename(self) or 'nn.Module')
end
function Module:updateGradInput(input, gradOutput)
  E.fail(self.__fnUpdateGradInput, '%s is abstract: a module class must implement updateGradInput (this one has none)',
         nn.typename(self) or 'nn.Module')
end
function Module:accGradParameters(input, gradOutput, scale) end

function Module:forward(input)
  return self:updateOutput(input)
end

-- backward = updateGradInput, then accGradParameters (which adds scale * dL/dparams into the gradients)
local function backward(self, input, gradOutput, scale)
  self:updateGradInput(input, gradOutput)
  self:accGradParameters(input, gradOutput, scale)
  return self.gradInput
end
function Module:backward(input, gradOutput, scale)
  scale = scale or 1
  return nn._as(self, self.__fnBackward, backward, input, gradOutput, scale)
end

function Module:training()
  self.train = true
  for _, c in ipairs(self:namedChildren()) do c[2]:training() end
  return self
end
function Module:evaluate()
  self.train = false
  for _, c in ipairs(self:namedChildren()) do c[2]:evaluate() end
  return self
end

---------------------------------------------------------------------------- parameters
-- ordered list of {name, param, grad, owner, field} over the module tree, each tensor once (a tensor
-- shared by two modules is listed under its first name, as PyTorch does)
function Module:_paramList(prefix, out, seen)
  out, seen, prefix = out or {}, seen or {}, prefix or ''
  for _, pn in ipairs(self._paramNames or {}) do
    local p = self[pn[1]]
    if p ~= nil and not seen[p] then
      seen[p] = true
      out[#out + 1] = { name = prefix .. pn[1], param = p, grad = self[pn[2]], owner = self, field = pn[1],
                        gradField = pn[2] }
    end
  end
  for _, c in ipairs(self:namedChildren()) do
    c[2]:_paramList(prefix .. c[1] .. '.', out, seen)
  end
  return out
end

function Module:_bufferList(prefix, out)
  out, prefix = out or {}, prefix or ''
  for _, bn in ipairs(self._bufferNames or {}) do
    if bn[2] and self[bn[1]] ~= nil then out[#out + 1] = { name = prefix .. bn[1], tensor = self[bn[1]], owner = self, field = bn[1] } end
  end
  for _, c in ipairs(self:namedChildren()) do c[2]:_bufferList(prefix .. c[1] .. '.', out) end
  return out
end

-- parameters() -> {params}, {gradParams} (same order)
function Module:parameters()
  local ps, gs = {}, {}
  for i, e in ipairs(self:_paramList()) do ps[i], gs[i] = e.param, e.grad end
  return ps, gs
end

-- namedParameters() -> {name = tensor}, with PyTorch's state_dict names
function Module:namedParameters()
  local out = {}
  for _, e in ipairs(self:_paramList()) do out[e.name] = e.param end
  return out
end

-- namedGradParameters() -> {name = gradient tensor}, under the names namedParameters() gives the parameters
function Module:namedGradParameters()
  local out = {}
  for _, e in ipairs(self:_paramList()) do out[e.name] = e.grad end
  return out
end

function Module:zeroGradParameters()
  for _, e in ipairs(self:_paramList()) do
    if e.grad ~= nil then e.grad:zero() end
  end
end
Module.zeroGrad = Module.zeroGradParameters

-- points tensor t (in place: every reference to t sees it) at a contiguous view of flat's storage,
-- `off` elements in
local function rebind(t, flat, off)
  local st = flat.storage
  if t.storage ~= st then
    C.fa_storage_retain(st)
    C.fa_storage_release(t.storage)
    t.storage = st
  end
  t.desc.data = ffi.cast('char*', flat.desc.data) + off * C.fa_dtype_size(t.desc.dtype)
  fa._set_desc(t.desc, t.desc, nil, 'getParameters') -- contiguous strides over its own sizes
end

-- when the tensors already lie back to back, contiguous, in one storage that they fill exactly, a 1-D
-- view of that storage; nil otherwise
local function already_flat(tensors)
  local first = tensors[1]
  if first == nil then return nil end
  local st = first.storage
  local es = C.fa_dtype_size(first.desc.dtype)
  local base = ffi.cast('char*', st.data)
  local off = 0
  for _, t in ipairs(tensors) do
    if t.storage ~= st or t.desc.dtype ~= first.desc.dtype or not t:isContiguous()
       or ffi.cast('char*', t.desc.data) ~= base + off * es then
      return nil
    end
    off = off + t:numel()
  end
  if off * es ~= st.nbytes then return nil end
  local v = fa._view_of(first)
  v.desc.data = st.data
  fa._set_desc(v.desc, { off }, nil, 'getParameters')
  return v
end

local function flatten(fn, tensors, what)
  local v = already_flat(tensors)
  if v then return v end
  local total = 0
  local dt, dev = tensors[1].desc.dtype, tensors[1].desc.device
  for i, t in ipairs(tensors) do
    if t.desc.dtype ~= dt or t.desc.device ~= dev then
      E.fail(fn, 'all %s must have one dtype and device: %s on %s and %s on %s', what,
             tensors[1]:dtype(), tensors[1]:device(), t:dtype(), t:device())
    end
    total = total + t:numel()
  end
  local flat = fa.empty(total, { dtype = dt, device = dev })
  local off = 0
  for _, t in ipairs(tensors) do
    local n = t:numel()
    if n > 0 then flat:narrow(1, off + 1, n):copy(t) end
    rebind(t, flat, off)
    off = off + n
  end
  return flat
end

-- The flat tensors getParameters() returned, each with what it covered: {module, params, grads, and the
-- data pointer of each}. An optimiser step checks its x and gradient here (nn._checkFlat), so flat views
-- that no longer hold the module's parameters (after :add(), :type(), :cuda(), or a getParameters() call
-- that had to move them) raise an error instead of training copies nobody reads.
local flats = setmetatable({}, { __mode = 'k' })

local function ptrs(list)
  local out = {}
  for i, t in ipairs(list) do out[i] = ffi.cast('char*', t.desc.data) end
  return out
end

-- whether record r still describes r.module: the same parameter and gradient tensors (in _paramList's
-- order, each tensor once), still at the places the flat tensors cover. Walks the tree without building
-- the list: this runs on every optimiser step.
local function covers(m, r, i, seen)
  for _, pn in ipairs(m._paramNames or {}) do
    local p = m[pn[1]]
    if p ~= nil and not seen[p] then
      seen[p] = true
      i = i + 1
      local g = m[pn[2]]
      if not rawequal(p, r.params[i]) or not rawequal(g, r.grads[i]) or p.storage ~= r.pstorage
         or g.storage ~= r.gstorage or ffi.cast('char*', p.desc.data) ~= r.pptr[i]
         or ffi.cast('char*', g.desc.data) ~= r.gptr[i] then
        return nil
      end
    end
  end
  for _, c in ipairs(m:namedChildren()) do
    i = covers(c[2], r, i, seen)
    if i == nil then return nil end
  end
  return i
end
local function flat_valid(r)
  return covers(r.module, r, 0, {}) == #r.params
end

-- raises (naming fn) when x or dfdx is a flat tensor from getParameters() that went stale
function nn._checkFlat(fn, x, dfdx)
  local rx, rg = flats[x], flats[dfdx]
  for _, e in ipairs({ { rx, 'x', 'parameters' }, { rg, 'gradient', 'gradients' } }) do
    local r = e[1]
    if r ~= nil and not flat_valid(r) then
      E.fail(fn, "argument '%s': these flat %s from %s:getParameters() no longer hold the module's %s (the " ..
             'module changed after that call: :add(), :type(), :double(), :cuda(), or getParameters() moved them ' ..
             'again); call getParameters() again and use the tensors it returns', e[2], e[3],
             'fa.' .. (nn.typename(r.module) or 'nn.Module'), e[3])
    end
  end
  if rx ~= nil and rg ~= nil and rx.module ~= rg.module then
    E.fail(fn, "argument 'gradient': the flat gradients come from another getParameters() call than the parameters 'x'")
  end
end

-- getParameters() -> flatParams, flatGradParams: all parameters (and their gradients) are moved into one
-- contiguous storage each and the module's tensors become views of it, so an optimiser updates the
-- module through the flat tensor. Idempotent: a second call finds the parameters already flat and returns
-- views of the same storage (the first call's tensors stay right). A structural change (:add(), :type(),
-- :cuda()) makes earlier flat tensors stale: fa.optim then raises an error; call getParameters() again.
function Module:getParameters()
  local fn = 'fa.' .. (nn.typename(self) or 'nn.Module') .. ':getParameters'
  local ps, gs = self:parameters()
  if #ps == 0 then
    return fa.empty(0), fa.empty(0)
  end
  for i = 1, #ps do
    if gs[i] == nil then E.fail(fn, 'parameter %d has no gradient tensor', i) end
  end
  local fp, fg = flatten(fn, ps, 'parameters'), flatten(fn, gs, 'gradients')
  local r = { module = self, params = ps, grads = gs, pstorage = fp.storage, gstorage = fg.storage,
              pptr = ptrs(ps), gptr = ptrs(gs) }
  flats[fp], flats[fg] = r, r
  return fp, fg
end

---------------------------------------------------------------------------- state dict
-- stateDict() -> {name = tensor}: the parameters and persistent buffers (the tensors themselves, not
-- copies), with PyTorch's state_dict names, ready for fa.save
function Module:stateDict()
  local out = {}
  for _, e in ipairs(self:_paramList()) do out[e.name] = e.param end
  for _, e in ipairs(self:_bufferList()) do out[e.name] = e.tensor end
  return out
end
Module.state_dict = Module.stateDict

-- loadStateDict(dict, strict = true): copies dict's values into the parameters and buffers (any dtype or
-- device; converted by the copy). strict: missing and unexpected names are errors. Every name and shape
-- is checked before anything is copied, so a failed load changes nothing.
function Module:loadStateDict(dict, strict)
  local fn = 'fa.' .. (nn.typename(self) or 'nn.Module') .. ':loadStateDict'
  if type(dict) ~= 'table' or fa.isTensor(dict) then E.argv(fn, 'dict', 'a table {name = tensor}', dict) end
  -- m:loadStateDict(fa.load(path)) passes the file's metadata table (fa.load's second result) as `strict`
  if type(strict) == 'table' and not fa.isTensor(strict) then strict = nil end
  strict = E.boolean(fn, 'strict', strict, true) ~= false
  local targets = {}
  for _, e in ipairs(self:_paramList()) do targets[#targets + 1] = { e.name, e.param } end
  for _, e in ipairs(self:_bufferList()) do targets[#targets + 1] = { e.name, e.tensor } end
  local known, missing, plan = {}, {}, {}
  for _, t in ipairs(targets) do
    local name, dst = t[1], t[2]
    known[name] = true
    local src = dict[name]
    if src == nil then
      missing[#missing + 1] = name
    else
      if not fa.isTensor(src) then
        E.argv(fn, 'dict', string.format("a tensor under '%s'", name), src)
      end
      if not src:isSameSizeAs(dst) then
        E.arg(fn, 'dict', string.format("a tensor of size %s under '%s'", fa._shape_str(dst, 'x'), name), src)
      end
      plan[#plan + 1] = { dst, src }
    end
  end
  local unexpected = {}
  for k in pairs(dict) do if not known[k] then unexpected[#unexpected + 1] = tostring(k) end end
  table.sort(unexpected)
  if strict and (#missing > 0 or #unexpected > 0) then
    local parts = {}
    if #missing > 0 then parts[#parts + 1] = 'missing: ' .. table.concat(missing, ', ') end
    if #unexpected > 0 then parts[#parts + 1] = 'unexpected: ' .. table.concat(unexpected, ', ') end
    E.fail(fn, "argument 'dict': the state dict does not match the module (%s)", table.concat(parts, '; '))
  end
  for _, p in ipairs(plan) do p[1]:copy(p[2]) end
  return missing, unexpected
end
Module.load_state_dict = Module.loadStateDict

---------------------------------------------------------------------------- type conversion
-- converts every tensor reachable from the module (parameters, gradients, buffers, outputs), keeping
-- tensors that were shared shared. Floating tensors take `dtype` (when given); all take `device`.
-- first pass: converted copies of every tensor, recorded as {table, key, new tensor}; nothing is
-- assigned until every conversion has succeeded, so a failed :cuda() leaves the module as it was
local function convert(obj, dtype, device, cache, seen, plan)
  if seen[obj] then return end
  seen[obj] = true
  for k, v in pairs(obj) do
    if fa.isTensor(v) then
      local c = cache[v]
      if c == nil then
        local dt = (dtype ~= nil and v:isFloatingPoint()) and dtype or v.desc.dtype
        c = v:to(dt, device == nil and v.desc.device or device)
        cache[v] = c
      end
      plan[#plan + 1] = { obj, k, c }
    elseif type(v) == 'table' and not rawget(v, '__typename') then -- tables and child modules, not classes
      convert(v, dtype, device, cache, seen, plan)
    end
  end
end

-- to(dtype, device): e.g. m:to('float64'), m:to(nil, 'cuda'), m:to('float32', 'cpu')
function Module:to(dtype, device, fn)
  fn = fn or 'fa.' .. (nn.typename(self) or 'nn.Module') .. ':to'
  local ok, dt = pcall(fa.dtype_id, dtype, fn)
  if dtype ~= nil and (not ok or not fa.empty({ 0 }, { dtype = dt }):isFloatingPoint()) then
    E.argv(fn, 'dtype', 'a floating-point dtype (float32, float64, bfloat16, float16) or nil', dtype)
  end
  if dtype == nil then dt = nil end
  local okd, dev = pcall(fa.device_id, device, fn)
  if device ~= nil and (not okd or (type(device) == 'number' and (device ~= math.floor(device) or device < -1))) then
    E.argv(fn, 'device', "'cpu', 'cuda', 'cuda:N' or nil", device)
  end
  if device == nil then dev = nil end
  local plan = {}
  convert(self, dt, dev, {}, {}, plan)
  for _, e in ipairs(plan) do e[1][e[2]] = e[3] end
  return self
end

-- type() -> 'fa.FloatTensor' (the parameters' type); type(name) converts ('torch.DoubleTensor',
-- 'fa.FloatTensor', 'float64', 'torch.CudaTensor', ...)
function Module:type(t)
  if t == nil then
    local ps = self:parameters()
    return ps[1] and ps[1]:type() or fa.Tensor.type(fa.empty(0))
  end
  if t == 'torch.CudaTensor' or t == 'fa.CudaTensor' or t == 'cuda' then return self:cuda() end
  return self:to(t, nil, 'fa.' .. (nn.typename(self) or 'nn.Module') .. ':type')
end
function Module:float() return self:to('float32') end
function Module:double() return self:to('float64') end
function Module:half() return self:to('float16') end
function Module:bfloat16() return self:to('bfloat16') end
function Module:cuda(dev) return self:to(nil, dev or 'cuda') end
function Module:cpu() return self:to(nil, 'cpu') end

---------------------------------------------------------------------------- clone
local function deepcopy(v, cache)
  if cache[v] ~= nil then return cache[v] end
  if fa.isTensor(v) then
    local c = v:clone()
    cache[v] = c
    return c
  elseif type(v) == 'cdata' then
    local c = ffi.new(ffi.typeof(v))
    ffi.copy(c, v, ffi.sizeof(v))
    cache[v] = c
    return c
  elseif type(v) == 'table' then
    if rawget(v, '__typename') then return v end -- a class table: shared, not copied
    local c = {}
    cache[v] = c
    for k, x in pairs(v) do c[deepcopy(k, cache)] = deepcopy(x, cache) end
    return setmetatable(c, getmetatable(v))
  end
  return v
end

-- clone(...): an independent deep copy. clone('weight', 'bias') shares those fields (and their
-- gradients' storage is not shared) with the original, recursively, as Torch7's clone(...) does.
function Module:clone(...)
  local c = deepcopy(self, {})
  local share = { ... }
  if #share > 0 then
    local function walk(a, b)
      for _, name in ipairs(share) do
        if fa.isTensor(a[name]) then b[name] = a[name] end
      end
      local ca, cb = a:namedChildren(), b:namedChildren()
      for i = 1, #ca do walk(ca[i][2], cb[i][2]) end
    end
    walk(self, c)
  end
  return c
end

-- clearState(): drops the output/gradInput buffers (smaller saves, less memory when idle)
function Module:clearState()
  self.output, self.gradInput = nil, nil
  for _, c in ipairs(self:namedChildren()) do c[2]:clearState() end
  return self
end

-- apply(fn): fn(module) on this module and every descendant
function Module:apply(fn)
  if type(fn) ~= 'function' then
    E.argv('fa.' .. (nn.typename(self) or 'nn.Module') .. ':apply', 'fn', 'a function', fn)
  end
  fn(self)
  for _, c in ipairs(self:namedChildren()) do c[2]:apply(fn) end
end

return Module

-- dropout.lua: nn.Dropout(p = 0.5): in training, zeroes each element with probability p and scales the
-- rest by 1/(1-p) (the mask comes from fa's RNG stream: fa.manualSeed makes it reproducible); in
-- evaluate() mode, and for p = 0, the identity (output is the input tensor itself).
local fa = require 'fastattn'
local nn = require 'fastattn.nn'
local F = require 'fastattn.functional'

local Dropout = nn.class('Dropout', nn.Module)

function Dropout:__init(p)
  nn.Module.__init(self)
  if type(p) == 'table' then p = p.p end
  p = p or 0.5
  F._check_p('nn.Dropout', p)
  self.p = p
end

function Dropout:__tostring__() return string.format('nn.Dropout(%g)', self.p) end

function Dropout:_active() return self.train and self.p > 0 end

function Dropout:updateOutput(input)
  if not fa.isTensor(input) then error(tostring(self) .. ': expected a tensor input, got ' .. type(input), 0) end
  if not self:_active() then
    self.output = input
    return input
  end
  -- own buffers, kept apart from self.output, which may be the caller's input after an evaluate() pass
  self._output = nn._buffer(self._output, input:size(), input)
  self.mask = nn._buffer(self.mask, input:size(), fa.dtypes.bool, input.desc.device)
  if self.p == 1 then
    self._output:zero()
    self.mask:zero()
  else
    F.dropout_forward(self._output, self.mask, input, self.p)
  end
  self.output = self._output
  return self.output
end

function Dropout:updateGradInput(input, gradOutput)
  if not self:_active() then
    self.gradInput = gradOutput
    return gradOutput
  end
  self._gradInput = nn._buffer(self._gradInput, input:size(), input)
  if self.p == 1 then self._gradInput:zero()
  else F.dropout_backward(self._gradInput, gradOutput, self.mask, self.p) end
  self.gradInput = self._gradInput
  return self.gradInput
end

return Dropout

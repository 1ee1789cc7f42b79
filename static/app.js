// kyberhook dashboard: small enhancements only; every form works without this file.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // Copy buttons: data-copy names the input whose value is copied.
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var input = document.getElementById(button.getAttribute("data-copy"));
      if (!input) { return; }
      var done = function () {
        var label = button.textContent;
        button.textContent = "Copied";
        setTimeout(function () { button.textContent = label; }, 1500);
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(input.value).then(done, function () { input.select(); });
      } else {
        input.select();
        try { document.execCommand("copy"); done(); } catch (e) { /* selected: the user can copy */ }
      }
    });
  });
  // An "All <family> events" box stands for family.*: its single boxes are then implied.
  document.querySelectorAll("input[data-family]").forEach(function (all) {
    var group = all.closest("fieldset");
    var sync = function () {
      group.querySelectorAll("input[type=checkbox]:not([data-family])").forEach(function (box) {
        box.disabled = all.checked;
      });
    };
    all.addEventListener("change", sync);
    sync();
  });
});

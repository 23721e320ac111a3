// The CT viewer of the patient page: a slider over the slices (z order) and a
// Play/Pause button that steps through them. Images come from
// <data-base><index>.png, rendered by the server; no library, no inline code.
(function () {
  "use strict";

  var FRAMES_PER_SECOND = 8;

  function setUp(root) {
    var count = parseInt(root.getAttribute("data-count"), 10);
    var base = root.getAttribute("data-base");
    var image = root.querySelector(".slice-image");
    var slider = root.querySelector(".slice-slider");
    var label = root.querySelector(".slice-label");
    var play = root.querySelector(".play");
    if (!count || !base || !image || !slider || !play) {
      return;
    }
    var badge = root.querySelector(".marked-badge");
    var overlay = root.querySelector(".heatmap-overlay");
    var heatSwitch = root.querySelector(".heatmap-switch");
    var marked = {};
    (root.getAttribute("data-marked") || "").split(",").forEach(function (value) {
      if (value !== "") {
        marked[parseInt(value, 10)] = true;
      }
    });
    var current = parseInt(slider.value, 10) || 0;
    var timer = null;
    var waiting = false;  // the next frame waits for the current image to load
    var preloaded = {};

    function url(index) {
      return base + index + ".png";
    }

    function preload(index) {
      if (index < 0 || index >= count || preloaded[index]) {
        return;
      }
      var img = new Image();
      img.src = url(index);
      preloaded[index] = img;
    }

    function show(index) {
      current = Math.max(0, Math.min(count - 1, index));
      var text = "Slice " + (current + 1) + " of " + count;
      waiting = true;
      image.src = url(current);
      image.alt = "CT slice " + (current + 1) + " of " + count + ", lung window";
      slider.value = String(current);
      slider.setAttribute("aria-valuetext", text);
      if (label) {
        label.textContent = text;
      }
      if (badge) {
        badge.hidden = !marked[current];
        root.classList.toggle("on-marked", !!marked[current]);
      }
      showHeat();
      preload(current + 1);
      preload(current - 1);
    }

    function showHeat() {
      if (!overlay || !heatSwitch) {
        return;
      }
      if (heatSwitch.checked) {
        overlay.src = base + current + "/heatmap.png";
        overlay.hidden = false;
      } else {
        overlay.hidden = true;
        overlay.removeAttribute("src");
      }
    }

    function stop() {
      if (timer !== null) {
        window.clearTimeout(timer);
        timer = null;
      }
      play.textContent = "Play";
      play.setAttribute("aria-pressed", "false");
      root.classList.remove("playing");
    }

    function step() {
      timer = null;
      if (play.getAttribute("aria-pressed") !== "true") {
        return;
      }
      if (waiting) {  // try again shortly: never queue images faster than they arrive
        timer = window.setTimeout(step, 1000 / FRAMES_PER_SECOND / 2);
        return;
      }
      show((current + 1) % count);
      timer = window.setTimeout(step, 1000 / FRAMES_PER_SECOND);
    }

    function start() {
      play.textContent = "Pause";
      play.setAttribute("aria-pressed", "true");
      root.classList.add("playing");
      if (current >= count - 1) {
        show(0);
      }
      timer = window.setTimeout(step, 1000 / FRAMES_PER_SECOND);
    }

    var jumps = root.querySelectorAll("[data-slice]");
    for (var j = 0; j < jumps.length; j += 1) {
      jumps[j].addEventListener("click", function (event) {
        stop();
        show(parseInt(event.currentTarget.getAttribute("data-slice"), 10) || 0);
      });
    }
    if (heatSwitch) {
      heatSwitch.addEventListener("change", showHeat);
    }
    if (overlay) {
      overlay.addEventListener("error", function () { overlay.hidden = true; });
    }
    image.addEventListener("load", function () { waiting = false; });
    image.addEventListener("error", function () { waiting = false; });
    slider.addEventListener("input", function () {
      stop();
      show(parseInt(slider.value, 10) || 0);
    });
    play.addEventListener("click", function () {
      if (play.getAttribute("aria-pressed") === "true") {
        stop();
      } else {
        start();
      }
    });
    root.addEventListener("keydown", function (event) {
      if (event.target === slider) {
        return;  // the range input handles its own keys
      }
      if (event.key === "ArrowRight" || event.key === "ArrowDown") {
        stop();
        show(current + 1);
        event.preventDefault();
      } else if (event.key === "ArrowLeft" || event.key === "ArrowUp") {
        stop();
        show(current - 1);
        event.preventDefault();
      }
    });
    waiting = !image.complete;
    if (badge) {
      badge.hidden = !marked[current];
      root.classList.toggle("on-marked", !!marked[current]);
    }
    root.classList.add("ready");
    preload(current + 1);
  }

  var viewers = document.querySelectorAll("[data-viewer]");
  for (var i = 0; i < viewers.length; i += 1) {
    setUp(viewers[i]);
  }
}());
